#!/usr/bin/env python3
"""A `jail --proc` rule program: allow the hosts named on the command line, deny the rest.

    jail --proc "python3 examples/allow_hosts.py pypi.org files.pythonhosted.org" -- pip download requests

jail writes one JSON request per line (url, method, scheme, host, port, path, query, headers,
requester_ip, id) and reads one answer per line. Echoing the id lets answers come back in any order.
"""

import json
import sys

allowed = {host.lower() for host in sys.argv[1:]}

for line in sys.stdin:
    request = json.loads(line)
    if request["host"] in allowed:
        answer = {"id": request["id"], "allow": True}
    else:
        answer = {"id": request["id"], "deny_message": f"{request['host']} is not on the allow list"}
    print(json.dumps(answer), flush=True)
