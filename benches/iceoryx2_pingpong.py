"""iceoryx2 (PyPI `iceoryx2`) request-response ping-pong through its Python
bindings, busy-polling on both sides: the comparison row for
docs/PERFORMANCE.md's shared-memory table. The server calls the same Python
`echo(data)` per request.

Usage: python3 benches/iceoryx2_pingpong.py SECONDS SIZE
Prints: size=N round_trips_per_s=R p50_us=A p99_us=B
"""

import ctypes
import multiprocessing as mp
import sys
import time

import iceoryx2 as iox2


def echo(data: bytes) -> bytes:
    return data


def service(size):
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    payload = ctypes.c_uint8 * size
    svc = (
        node.service_builder(iox2.ServiceName.new(f"pyipcd/bench/{size}"))
        .request_response(payload, payload)
        .open_or_create()
    )
    return node, svc, payload


def server(size, ready, stop):
    node, svc, payload = service(size)
    srv = svc.server_builder().create()
    ready.set()
    while not stop.is_set():
        req = srv.receive()
        if req is None:
            continue
        data = bytes(req.payload().contents)
        reply = echo(data)
        req.send_copy(payload.from_buffer_copy(reply))
        req.delete()


def main(seconds, size):
    ready, stop = mp.Event(), mp.Event()
    proc = mp.Process(target=server, args=(size, ready, stop), daemon=True)
    proc.start()
    ready.wait(10)
    node, svc, payload = service(size)
    client = svc.client_builder().create()
    msg = payload.from_buffer_copy(b"x" * size)
    lat = []
    warm = time.perf_counter() + 0.3
    end = warm + seconds
    while True:
        t0 = time.perf_counter_ns()
        pending = client.send_copy(msg)
        while True:
            resp = pending.receive()
            if resp is not None:
                break
        assert bytes(resp.payload().contents) == bytes(msg)
        t1 = time.perf_counter_ns()
        now = time.perf_counter()
        if now >= end:
            break
        if now >= warm:
            lat.append(t1 - t0)
    stop.set()
    proc.join(5)
    lat.sort()
    n = len(lat)
    print(
        f"size={size} round_trips_per_s={n / seconds:.0f} "
        f"p50_us={lat[n // 2] / 1000:.2f} p99_us={lat[int(n * 0.99)] / 1000:.2f}"
    )


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
