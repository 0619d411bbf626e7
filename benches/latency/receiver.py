"""A rest-hook endpoint for benches/latency/notifications.sh: answers 200 and appends
"<receive time> <focus reference>" to a file for each event a notification tells of.

usage: receiver.py PORT FILE
"""

import http.server
import json
import sys
import time

out = open(sys.argv[2], "a", buffering=1, encoding="utf-8")


class Handler(http.server.BaseHTTPRequestHandler):
    # Connections kept alive, as a production endpoint keeps them.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        received = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        foci = []
        try:
            for parameter in json.loads(body)["entry"][0]["resource"]["parameter"]:
                if parameter["name"] == "notification-event":
                    part = [p for p in parameter["part"] if p["name"] == "focus"][0]
                    foci.append(part["valueReference"]["reference"])
        except (ValueError, KeyError, IndexError):
            pass
        for focus in foci or ["-"]:
            out.write(f"{received:.6f} {focus}\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    # Python's default backlog of 5 drops the SYNs of a round's parallel posts beyond it, and
    # each waits for the 1 s retransmission: a delay of the receiver's, not the server's.
    request_queue_size = 128
    daemon_threads = True


Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
