"""A stand-in identity provider for tests/portal.sh's SMART launch: /authorize answers a
loopback /portal redirect URI with a code bound to the PKCE challenge (S256 only), the
redirect URI and the client's state; /token gives the access token and patient id written in
the file $MOCK_IDP_TOKEN_FILE (two lines) for that code only, with the matching
code_verifier and redirect URI, once.

Usage: python3 mock_idp.py PORT CLIENT_ID"""

import base64
import hashlib
import json
import os
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

PORT, CLIENT_ID = sys.argv[1], sys.argv[2]
codes = {}


def portal_on_loopback(uri):
    url = urlparse(uri)
    return url.scheme == "http" and url.hostname == "127.0.0.1" and url.path == "/portal"


class Provider(BaseHTTPRequestHandler):
    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/authorize":
            return self.answer(404)
        if (
            query.get("response_type") != "code"
            or query.get("client_id") != CLIENT_ID
            or not portal_on_loopback(query.get("redirect_uri", ""))
            or query.get("code_challenge_method") != "S256"
            or not query.get("code_challenge")
            or not query.get("state")
            or "launch/patient" not in query.get("scope", "").split()
        ):
            return self.answer(400, b"bad authorization request: " + url.query.encode())
        code = secrets.token_urlsafe(16)
        codes[code] = (query["code_challenge"], query["redirect_uri"])
        target = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query["state"]})
        self.answer(302, headers=[("Location", target)])

    def do_POST(self):
        if urlparse(self.path).path != "/token":
            return self.answer(404)
        length = int(self.headers.get("Content-Length", "0"))
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        challenge, redirect_uri = codes.pop(form.get("code", ""), (None, None))
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        origin = "{0.scheme}://{0.netloc}".format(urlparse(redirect_uri or ""))
        cors = [("Access-Control-Allow-Origin", origin), ("Content-Type", "application/json")]
        if (
            form.get("grant_type") != "authorization_code"
            or form.get("client_id") != CLIENT_ID
            or form.get("redirect_uri") != redirect_uri
            or challenge is None
            or digest != challenge
        ):
            return self.answer(400, json.dumps({"error": "invalid_grant"}).encode(), cors)
        with open(os.environ["MOCK_IDP_TOKEN_FILE"]) as f:
            token, patient = f.read().split()
        body = {"access_token": token, "token_type": "Bearer", "patient": patient,
                "scope": "launch/patient patient/*.rs patient/Consent.cu"}
        self.answer(200, json.dumps(body).encode(), cors + [("Cache-Control", "no-store")])

    def log_message(self, *args):
        pass


# Threads: browsers open spare connections that would otherwise hold the one thread.
ThreadingHTTPServer(("127.0.0.1", int(PORT)), Provider).serve_forever()
