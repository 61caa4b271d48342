#!/bin/bash
# The memory a subscriber queue costs: peak RSS of flowbus while a flow far slower than the
# burst holds N (default 100,000) QoS 1 messages of 200 bytes, published by loadgen --burst
# to a broker without limits. Usage: benches/bridge/burst-memory.sh [FLOWBUS] [N] (from the
# repository root, after building flowbus and the bench binaries).
set -u
FB=${1:-target/release/flowbus}; N=${2:-100000}
D=$(mktemp -d /tmp/memburst.XXXX); PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\nlog_dest none\nset_tcp_nodelay true\n' $PORT > $D/m.conf
mosquitto -c $D/m.conf & MP=$!
sleep 0.5
cat > $D/f.json <<F
{"name":"mem","nodes":[
 {"id":"in","type":"MQTTSubscribe","url":"tcp://127.0.0.1:$PORT","topic":"bench/in/#","qos":1},
 {"id":"slow","type":"Compute","max_operations":100000000,"code":"let i = 0; while i < 200000 { i += 1; }"},
 {"id":"out","type":"MQTTPublish","url":"tcp://127.0.0.1:$PORT","topic":"bench/out","qos":1}],
 "connections":[{"from":"in.Out","to":"slow"},{"from":"slow.Out","to":"out"}]}
F
APORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf 'data_dir = "%s/data"\nflows = ["%s/f.json"]\n[admin]\nlisten = "127.0.0.1:%s"\n' $D $D $APORT > $D/fb.toml
$FB run --config $D/fb.toml > $D/out 2> $D/err & FP=$!
for i in $(seq 50); do grep -q "Subscribed to" $D/err && break; sleep 0.2; done
sleep 1
rss() { awk "/^$1:/{print \$2}" /proc/$FP/status; }
IDLE=$(rss VmRSS)
python3 - $N > $D/lines <<'P'
import sys
for i in range(int(sys.argv[1])):
    s='{"seq":%d,"pad":"' % i
    print(s + "x"*(200-len(s)-2) + '"}')
P
START=$(date +%s.%N)
target/bench/release/loadgen --url tcp://127.0.0.1:$PORT --qos 1 --burst $N --secs 20 --quiet-secs 2 > $D/lg 2>&1 &
LG=$!
recv() { $FB stats --json --config $D/fb.toml 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(s["MessagesReceived"] for s in v["servers"].values()))' 2>/dev/null || echo 0; }
for i in $(seq 120); do sleep 0.5; r=$(recv); [[ $r -ge $N ]] && break; done
END=$(date +%s.%N)
sleep 2
HWM=$(rss VmHWM); JOURNAL=$(du -sk $D/data/input 2>/dev/null | cut -f1)
echo "flowbus $FB: idle RSS ${IDLE} KiB, peak ${HWM} KiB after a ${N}-message burst (all $(recv) received in $(echo "$END - $START" | bc) s): +$(( (HWM-IDLE) )) KiB = $(( (HWM-IDLE)*1024/N )) bytes/message; journal ${JOURNAL} KiB; pauses: $(grep -c 'pausing receipt' $D/err)"
kill $LG $FP $MP; wait 2>/dev/null; rm -rf $D
