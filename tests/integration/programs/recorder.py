"""`recorder.py PORT`: HTTP/1.1 keep-alive, answers 200 "ok <path>". Every byte received goes to
stdout as `raw <repr>`, every request parsed as `req <method> <path>` (so a smuggled request
shows up in either). /slow answers after 5 s, /stall never answers, /stall-body sends a head and
half of its body, then nothing.
"""

import socket
import sys
import threading
import time

PORT = int(sys.argv[1])
lock = threading.Lock()


def out(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def serve(conn):
    buf = b""

    def more():
        nonlocal buf
        data = conn.recv(65536)
        out("raw " + repr(data))
        if not data:
            raise EOFError
        buf += data

    def line():
        nonlocal buf
        while b"\r\n" not in buf:
            more()
        i = buf.index(b"\r\n")
        text, buf = buf[:i], buf[i + 2 :]
        return text

    def take(n):
        nonlocal buf
        while len(buf) < n:
            more()
        data, buf = buf[:n], buf[n:]
        return data

    try:
        while True:
            request = line()
            if not request:
                continue
            headers = {}
            while True:
                h = line()
                if not h:
                    break
                k, _, v = h.partition(b":")
                headers[k.strip().lower()] = v.strip()
            method, path = request.split(b" ")[:2]
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int(line().split(b";")[0], 16)
                    if size == 0:
                        while line():
                            pass
                        break
                    take(size + 2)
            else:
                take(int(headers.get(b"content-length", b"0")))
            out(f"req {method.decode()} {path.decode()}")
            if path.startswith(b"/slow"):
                time.sleep(5)
            if path.startswith(b"/stall-body"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.")
                time.sleep(60)
            if path.startswith(b"/stall"):
                time.sleep(60)
            body = b"ok " + path
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
