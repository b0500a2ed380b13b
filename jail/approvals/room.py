"""The approvals room of one run, opened and closed by the session."""

from __future__ import annotations

import contextlib

from jail.approvals import AskSettings
from jail.approvals.channels import FdChannel, SocketChannel, hide_from_same_user, parse_fds
from jail.approvals.questions import Approvals, Decide, RecordRefusal
from jail.approvals.saved import RuleSaver


async def open_room(
    stack: contextlib.AsyncExitStack,
    jail_id: str,
    decide: Decide,
    settings: AskSettings,
    record_refusal: RecordRefusal,
) -> Approvals:
    """Questions, their socket, the --ask-fd channel and the save file, each released by `stack`."""
    saver = RuleSaver(settings.save_to) if settings.save_to is not None else None
    if saver is not None:
        saver.prepare()
        stack.callback(saver.remove_if_unused)
    approvals = Approvals(jail_id, decide, settings.ask_denials, settings.timeout, saver, record_refusal)
    stack.callback(approvals.close)
    channel = SocketChannel(approvals)
    await channel.start()
    stack.push_async_callback(channel.close)
    if settings.fd is not None:
        hide_from_same_user()
        fd_channel = FdChannel(approvals, *parse_fds(settings.fd))
        fd_channel.start()
        stack.callback(fd_channel.close)
    return approvals
