#!/usr/bin/env python3
"""Memory per idle keep-alive HTTP connection of a running proxy (docs/benchmarks.md, eleventh session).

Opens N connections to the proxy, sends two requests on each (`GET /rooms/r{i}/1k`, read whole: the body must be
1 KiB, as the benchmark origin serves; a connection moves to the HTTP relay after its second exchange), keeps them all
open and idle, waits 2 s, and prints the proxy's VmRSS growth per connection.

    scripts/http-idle-rss.py PORT N PID      # e.g. 18130 4000 $(pgrep -f "ott-proxy run")

N is bounded by the open-file limit of both this process and the proxy (a relayed connection holds two descriptors in
the proxy until `timeouts.upstream_idle`).
"""
import resource
import socket
import sys
import time

port, count, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib() -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


before = rss_kib()
sockets = []
for index in range(count):
    connection = socket.create_connection(("127.0.0.1", port))
    for _ in range(2):
        connection.sendall(b"GET /rooms/r%d/1k HTTP/1.1\r\nHost: bench\r\n\r\n" % index)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < received.index(b"\r\n\r\n") + 4 + 1024:
            chunk = connection.recv(65536)
            if not chunk:
                sys.exit(f"connection {index} closed by the proxy")
            received += chunk
    sockets.append(connection)
time.sleep(2)
after = rss_kib()
print(f"connections={count} rss_before_kib={before} rss_after_kib={after} bytes_per_conn={(after - before) * 1024 // count}")
