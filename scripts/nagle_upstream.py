"""An upstream as Python's http.server writes answers: the head in one write, the body in
another, on a socket without TCP_NODELAY (Nagle on), HTTP/1.1 keep-alive. Under Nagle the
body waits for the ACK of the head, and a peer that delays its ACK delays every answer.

Usage: nagle_upstream.py PORT
"""

import http.server
import sys

BODY = b"x" * 64


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()  # the head: one write
        self.wfile.write(BODY)  # the body: a second one

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
