#!/usr/bin/env python3
"""Where a bridged message's latency goes, from a packet capture of the broker's port.

    stages.py CAPTURE.pcap BROKER_PORT

Reads a pcap (tcpdump -w; Ethernet or Linux cooked link type) of everything on the broker's
loopback port during a benchmark run, reassembles each TCP direction into MQTT 3.1.1 packets,
and follows each message by the phase and sequence number in its JSON payload
("run":R,"seq":N):

    sent          producer → broker   PUBLISH bench/in/...
    in            broker → system     PUBLISH bench/in/...
    in_pubrel     broker → system     PUBREL for that packet id (QoS 2: when paho delivers)
    out           system → broker     PUBLISH bench/out/...
    out_pubrec    broker → system     PUBREC for the outgoing packet id (QoS 2)
    out_pubrel    system → broker     PUBREL for it (QoS 2)
    delivered     broker → consumer   PUBLISH bench/out/...

and prints p50/p90/p99 of each leg in ms, per phase of the load generator. "in → out" (QoS 0/1) or "in_pubrel → out" (QoS 2)
is the system's own time from receipt to its publication on the wire. Standard library only.
"""
import collections
import re
import struct
import sys

SEQ = re.compile(rb'"run":(\d+),"seq":(\d+)')
PUBLISH, PUBREC, PUBREL = 3, 5, 6


def packets(path):
    """(timestamp, source port, destination port, MQTT type, flags, body) in capture order."""
    with open(path, "rb") as f:
        head = f.read(24)
        magic = struct.unpack("<I", head[:4])[0]
        nanos = magic == 0xA1B23C4D
        link = struct.unpack("<I", head[20:24])[0]
        skip = {1: 14, 113: 16}.get(link, 0)
        buffers = collections.defaultdict(bytearray)
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _ = struct.unpack("<IIII", rec)
            ts = sec + frac / (1e9 if nanos else 1e6)
            ip = f.read(incl)[skip:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            sport, dport = struct.unpack(">HH", tcp[:4])
            data = tcp[(tcp[12] >> 4) * 4:]
            if not data:
                continue
            buf = buffers[(sport, dport)]
            buf.extend(data)
            while len(buf) >= 2:
                i, mult, length = 1, 1, 0
                while i < len(buf):
                    c = buf[i]
                    length += (c & 127) * mult
                    mult *= 128
                    i += 1
                    if not c & 128:
                        break
                else:
                    break
                if len(buf) < i + length:
                    break
                yield ts, sport, dport, buf[0] >> 4, buf[0] & 15, bytes(buf[i:i + length])
                del buf[:i + length]


def main():
    path, broker = sys.argv[1], int(sys.argv[2])
    t = collections.defaultdict(dict)  # (run, seq) -> leg -> time
    incoming = {}  # (system's port, packet id) -> seq, for PUBREL from the broker
    outgoing = {}  # (system's port, packet id) -> seq, for PUBREC/PUBREL of its publications
    for ts, sport, dport, kind, flags, body in packets(path):
        if kind == PUBLISH:
            tlen = struct.unpack(">H", body[:2])[0]
            topic = body[2:2 + tlen]
            qos = (flags >> 1) & 3
            pid = struct.unpack(">H", body[2 + tlen:4 + tlen])[0] if qos else None
            m = SEQ.search(body)
            if not m:
                continue
            seq = (int(m.group(1)), int(m.group(2)))  # phases reuse sequence numbers
            inbound = topic.startswith(b"bench/in/")
            if dport == broker:
                t[seq].setdefault("sent" if inbound else "out", ts)
                if not inbound and pid is not None:
                    outgoing[(sport, pid)] = seq
            elif sport == broker:
                t[seq].setdefault("in" if inbound else "delivered", ts)
                if inbound and pid is not None:
                    incoming[(dport, pid)] = seq
        elif kind in (PUBREC, PUBREL) and len(body) >= 2:
            pid = struct.unpack(">H", body[:2])[0]
            if kind == PUBREL and sport == broker and (dport, pid) in incoming:
                t[incoming.pop((dport, pid))].setdefault("in_pubrel", ts)
            elif kind == PUBREC and sport == broker and (dport, pid) in outgoing:
                t[outgoing[(dport, pid)]].setdefault("out_pubrec", ts)
            elif kind == PUBREL and dport == broker and (sport, pid) in outgoing:
                t[outgoing.pop((sport, pid))].setdefault("out_pubrel", ts)
    legs = [("sent", "in"), ("in", "in_pubrel"), ("in", "out"), ("in_pubrel", "out"),
            ("out", "delivered"), ("out", "out_pubrec"), ("out_pubrec", "out_pubrel"),
            ("sent", "delivered")]
    # One block per phase (the load generator's throughput phase queues messages by design;
    # the fixed-rate phase is the one to read).
    for run in sorted({r for r, _ in t}):
        msgs = [d for (r, _), d in t.items() if r == run]
        print(f"run {run}: {len(msgs)} messages")
        for a, b in legs:
            xs = sorted((d[b] - d[a]) * 1e3 for d in msgs if a in d and b in d)
            if not xs:
                continue
            q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
            print(f"  {a:>10} -> {b:<11} n={len(xs):6d}  p50 {q(.5):.3f}  p90 {q(.9):.3f}  "
                  f"p99 {q(.99):.3f} ms")


if __name__ == "__main__":
    main()
