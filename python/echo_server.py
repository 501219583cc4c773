"""The classic blocking echo server, as third-party code writes it.

Importing this module *runs* the server: it binds 127.0.0.1:50007, accepts one
connection, echoes every chunk back until the peer closes, then returns. It
knows nothing of pyipcd (scenarios.md, part A); pyipcd hosts it as a task.
"""

import os
import socket

HOST = "127.0.0.1"
PORT = int(os.environ.get("ECHO_SERVER_PORT", "50007"))

with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, PORT))
    s.listen(1)
    print("Waiting for connection...")
    conn, addr = s.accept()
    with conn:
        print("Connected by client", addr)
        while True:
            data = conn.recv(1024)
            if not data:
                break
            print("Received", data)
            conn.sendall(data)
print("Echo server finished")
