#!/usr/bin/env python3
"""Minimal QMP client for tests: qmp.py SOCKET CMD_JSON... prints one reply per line.
Negotiates capabilities first; events are skipped (printed to stderr)."""
import json, socket, sys


def main():
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    f = s.makefile("rw")

    def read():
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("qmp: connection closed")
            m = json.loads(line)
            if "event" in m:
                print(json.dumps(m), file=sys.stderr)
                continue
            return m

    greeting = read()
    assert "QMP" in greeting, greeting
    f.write('{"execute":"qmp_capabilities"}\n')
    f.flush()
    assert read() == {"return": {}}
    for cmd in sys.argv[2:]:
        f.write(cmd + "\n")
        f.flush()
        print(json.dumps(read()))


main()
