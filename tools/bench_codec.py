"""Benchmark the migration stream codec and channels (public API only).

Prints GB/s (1e9 bytes of guest page data per second) for:

1. codec only, in one process:
   * encode: ``StreamEncoder.ram_pages`` over the pages, batch by batch;
   * decode: feed the encoded stream to ``StreamDecoder`` in 4 MiB pieces
     (standing in for ``recv_into``), parse, and scatter every page into a
     pre-faulted destination (the receiver's one copy);
   for (a) every page of a random guest and (b) a sparse random page set
   with some zero pages;
2. ``--e2e``: sender and receiver in two processes over unix and tcp
   loopback: a raw blocking ``sendall``/``recv_into`` of the same bytes (the
   ceiling) against the product path (encoder + ``Channel.send_all`` ->
   ``Channel.receive_into`` + decoder + scatter).  Time is taken at the
   receiver from accept to the last page.  Prints the ratio.

Usage: python tools/bench_codec.py [--mib 1024] [--batch 1024] [--e2e]
Numbers on the 2-core machines vary by +-30 % with background load.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import resource

import numpy as np

from transport import (
    NEED_DATA,
    EndOfStream,
    RamPages,
    RamZeroPages,
    StreamDecoder,
    StreamEncoder,
    listen_channel,
    open_channel,
)

PS = 4096
GB = 1e9


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def busy_fraction(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``interval``."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit: float = 0.15, give_up_s: float = 30.0) -> float:
    """Wait until the machine is mostly idle (other sessions benchmark too)."""
    deadline = time.monotonic() + give_up_s
    while True:
        busy = busy_fraction()
        if busy < limit or time.monotonic() > deadline:
            return busy


def make_guest(npages: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    guest = np.empty((npages, PS), dtype=np.uint8)
    step = 16384
    for s in range(0, npages, step):
        guest[s : s + step] = rng.integers(0, 256, (min(step, npages - s), PS), dtype=np.uint8)
    return guest


def encode_stream(enc: StreamEncoder, guest: np.ndarray, idx: np.ndarray, batch: int, sink) -> tuple[int, int]:
    normal = zero = 0
    for s in range(0, len(idx), batch):
        res = enc.ram_pages("ram", guest, idx[s : s + batch])
        normal += res.normal
        zero += res.zero
        sink(res.buffers)
    return normal, zero


def prelude(enc: StreamEncoder, npages: int) -> bytes:
    return (
        enc.header()
        + enc.configuration("pc")
        + enc.section_start(1, "ram", 0, 4)
        + enc.ram_mem_size([("ram", npages * PS)])
        + enc.eos()
        + enc.section_footer(1)
        + enc.section_end(1)
    )


def coda(enc: StreamEncoder) -> bytes:
    return enc.eos() + enc.section_footer(1) + enc.eof()


def scatter(dst: np.ndarray, ev) -> int:
    rows = (ev.offsets >> np.uint64(12)).astype(np.intp)
    if isinstance(ev, RamPages):
        dst[rows] = ev.data
    else:
        dst[rows] = 0  # QEMU writes only if the page is not already zero; here: always
    return len(rows)


def bench_codec(label: str, guest: np.ndarray, idx: np.ndarray, batch: int) -> None:
    npages = guest.shape[0]
    payload = len(idx) * PS
    enc = StreamEncoder()
    stream = bytearray(prelude(enc, npages))
    # encode timing: buffers are consumed by a no-op sink (no send)
    t0 = time.perf_counter()
    normal, zero = encode_stream(enc, guest, idx, batch, lambda bufs: None)
    t_enc = time.perf_counter() - t0
    # build the stream for the decoder (not timed)
    enc2 = StreamEncoder()
    stream = bytearray(prelude(enc2, npages))
    encode_stream(enc2, guest, idx, batch, lambda bufs: [stream.extend(b) for b in bufs])
    stream += coda(enc2)
    dst = np.zeros_like(guest)
    dst[:, 0] = 1  # pre-fault
    dec = StreamDecoder(max_block_bytes={"ram": npages * PS})
    mv = memoryview(stream)
    pos = 0
    events = 0
    t0 = time.perf_counter()
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            n = min(4 << 20, len(mv) - pos)
            buf = dec.get_buffer(n)
            buf[:n] = mv[pos : pos + n]
            dec.buffer_updated(n)
            pos += n
            continue
        if isinstance(ev, (RamPages, RamZeroPages)):
            scatter(dst, ev)
            events += 1
        elif isinstance(ev, EndOfStream):
            break
    t_dec = time.perf_counter() - t0
    ok = np.array_equal(dst[idx], guest[idx])
    print(
        f"{label:<34} pages={len(idx):>7} (normal {normal}, zero {zero}) "
        f"encode {payload / t_enc / GB:5.2f} GB/s | decode+scatter {payload / t_dec / GB:5.2f} GB/s "
        f"({events} page events, {len(stream) / len(idx):.0f} B/page) ok={ok}"
    )


# -- end to end: two processes -------------------------------------------------
def receiver_raw(kind: str, addr, nbytes: int) -> None:
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    ls.bind(addr)
    ls.listen(1)
    dst = np.zeros(nbytes, np.uint8)
    dst[::PS] = 1  # pre-fault
    print("READY", flush=True)
    conn, _ = ls.accept()
    c0, t0 = cpu_s(), time.perf_counter()
    mv = memoryview(dst)
    got = 0
    while got < nbytes:
        n = conn.recv_into(mv[got : got + (4 << 20)])
        if not n:
            break
        got += n
    dt, cpu = time.perf_counter() - t0, cpu_s() - c0
    print(f"RESULT {got / dt / GB:.3f} {cpu / (got / GB):.3f}", flush=True)


def sender_raw(kind: str, addr, data: np.ndarray) -> float:
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect(addr)
    c0 = cpu_s()
    mv = memoryview(data).cast("B")
    for i in range(0, len(mv), 4 << 20):
        s.sendall(mv[i : i + (4 << 20)])
    s.close()
    return cpu_s() - c0


def receiver_product(uri: str, npages: int) -> None:
    import trio

    async def run() -> None:
        dst = np.zeros((npages, PS), np.uint8)
        dst[:, 0] = 1  # pre-fault
        listener = await listen_channel(uri)
        print("READY", flush=True)
        async with listener:
            chan = await listener.accept()
        c0, t0 = cpu_s(), time.perf_counter()
        dec = StreamDecoder(max_block_bytes={"ram": npages * PS})
        pages = 0
        async with chan:
            while True:
                ev = await chan.next_event(dec)
                if isinstance(ev, (RamPages, RamZeroPages)):
                    pages += scatter(dst, ev)
                elif isinstance(ev, EndOfStream):
                    break
        dt, cpu = time.perf_counter() - t0, cpu_s() - c0
        print(f"RESULT {pages * PS / dt / GB:.3f} {cpu / (pages * PS / GB):.3f}", flush=True)

    trio.run(run)


def sender_product(uri: str, guest: np.ndarray, batch: int) -> float:
    import trio

    async def run() -> float:
        enc = StreamEncoder()
        chan = await open_channel(uri)
        c0 = cpu_s()
        async with chan:
            await chan.send_all([prelude(enc, guest.shape[0])])
            idx = np.arange(guest.shape[0])
            for s in range(0, len(idx), batch):
                res = enc.ram_pages("ram", guest, idx[s : s + batch])
                await chan.send_all(res.buffers)
            await chan.send_all([coda(enc)])
        return cpu_s() - c0

    return trio.run(run)


def e2e(guest: np.ndarray, batch: int, runs: int) -> None:
    npages = guest.shape[0]
    gb = guest.nbytes / GB
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("unix", "tcp"):
            for run in range(runs):
                busy = wait_quiet()
                port = _free_port()
                addr = os.path.join(tmp, f"raw{run}.sock") if kind == "unix" else ("127.0.0.1", port)
                where = addr if kind == "unix" else str(port)
                raw, raw_cpu = _run_pair(["raw", kind, where, str(npages)], lambda: sender_raw(kind, addr, guest))
                wait_quiet()
                uri = f"unix:{os.path.join(tmp, f'p{run}.sock')}" if kind == "unix" else f"tcp:127.0.0.1:{_free_port()}"
                prod, prod_cpu = _run_pair(["product", uri, str(npages)], lambda: sender_product(uri, guest, batch))
                r, p = float(raw.split()[0]), float(prod.split()[0])
                print(
                    f"e2e {kind:<4} run {run}: raw socket {r:5.2f} GB/s (CPU s/GB send {raw_cpu / gb:.2f} recv "
                    f"{float(raw.split()[1]):.2f}) | product {p:5.2f} GB/s (CPU s/GB send {prod_cpu / gb:.2f} recv "
                    f"{float(prod.split()[1]):.2f}) | ratio {p / r:4.2f}  [machine busy before: {busy:.0%}]",
                    flush=True,
                )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(args: list[str], send) -> tuple[str, float]:
    proc = subprocess.Popen([sys.executable, __file__, "--role", *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        send_cpu = send()
        line = proc.stdout.readline()
        proc.wait(timeout=120)
        return line.split(" ", 1)[1], send_cpu
    finally:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1024, help="pages per ram_pages call")
    ap.add_argument("--sparse", type=float, default=0.1, help="fraction of pages in the sparse set")
    ap.add_argument("--e2e", action="store_true", help="also run the two-process socket comparison")
    ap.add_argument("--runs", type=int, default=3, help="e2e runs per transport")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        if a.role[0] == "raw":
            kind, where, npages = a.role[1], a.role[2], int(a.role[3])
            receiver_raw(kind, where if kind == "unix" else ("127.0.0.1", int(where)), npages * PS)
        else:
            receiver_product(a.role[1], int(a.role[2]))
        return
    npages = a.mib * 256
    guest = make_guest(npages)
    print(f"machine busy: {wait_quiet():.0%} (waited up to 30 s for < 15 %)")
    rng = np.random.default_rng(1)
    bench_codec("all pages, random data", guest, np.arange(npages), a.batch)
    sparse = np.sort(rng.choice(npages, int(npages * a.sparse), replace=False))
    zeroed = rng.choice(sparse, len(sparse) // 4, replace=False)
    saved = guest[zeroed].copy()
    guest[zeroed] = 0
    bench_codec(f"sparse {a.sparse:.0%} sorted, 25% zero", guest, sparse, a.batch)
    bench_codec(f"sparse {a.sparse:.0%} shuffled, 25% zero", guest, rng.permutation(sparse), a.batch)
    guest[zeroed] = saved
    if a.e2e:
        e2e(guest, a.batch, a.runs)


if __name__ == "__main__":
    main()
