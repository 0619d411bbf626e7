"""A rest-hook endpoint for benches/latency/notifications.sh: answers 200 and appends
"<receive time> <focus reference>" to a file for each notification.

usage: receiver.py PORT FILE
"""

import http.server
import json
import sys
import time

out = open(sys.argv[2], "a", buffering=1, encoding="utf-8")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        received = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        focus = "-"
        try:
            for parameter in json.loads(body)["entry"][0]["resource"]["parameter"]:
                if parameter["name"] == "notification-event":
                    part = [p for p in parameter["part"] if p["name"] == "focus"][0]
                    focus = part["valueReference"]["reference"]
        except (ValueError, KeyError, IndexError):
            pass
        out.write(f"{received:.6f} {focus}\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
