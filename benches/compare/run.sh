#!/usr/bin/env bash
# Side-by-side load comparison: mediaroute vs nginx vs HAProxy doing the same routing,
# in front of the same two origins, measured in one run, interleaved and repeated.
#
# Targets (ONLY selects a subset, in this order): direct mediaroute nginx-64k nginx-default
# haproxy haproxy-splice. haproxy-splice is a second HAProxy process with the same config plus
# kernel splicing of response bodies (splice(2) through a pipe, no copy to user space).
#
#   bash benches/compare/run.sh            # full run (about 15 minutes)
#   ROUNDS=1 DURATION=5 bash benches/compare/run.sh   # quick look
#   ONLY="direct mediaroute" TESTS="4k slow" bash benches/compare/run.sh   # a subset
#   ONLY="mediaroute nginx-64k" TESTS="4k 4k-tls 1g 1g-tls" bash benches/compare/run.sh
#   ONLY="mediaroute haproxy haproxy-splice" MEDIAROUTE_BIN=/path/to/mediaroute bash benches/compare/run.sh
#
# Knobs: ROUNDS (3), DURATION (10, seconds per wrk test), SLOW_CLIENTS (1000), ONLY, TESTS,
# MEDIAROUTE_BIN (a mediaroute binary to measure; unset, the script builds target/release),
# ORIGIN_SENDFILE (on; off makes the origins copy each body into fresh socket buffers, as data
# that arrives from a network would be, instead of passing page-cache pages along),
# PROFILE (a directory: each wrk test also runs `perf record -a -g` on both CPUs, one file per
# target, test and round, e.g. `perf report -i DIR/mediaroute-1GiB-r1.data --sort cpu,comm,sym`;
# the numbers of a profiled run are not comparable with those of a plain one).
#
# TESTS: 4k 1m 1g slow 4k-log (the default), and 4k-tls 1g-tls: the 4k and 1g tests against TLS
# listeners of mediaroute and nginx (one self-signed ECDSA P-256 certificate made for the run;
# the origins stay plain HTTP; HAProxy and direct have no TLS rows).
# 4k-log: the 4k test with access logs on, against a second instance of mediaroute (log level
# info, stderr to a file), nginx-64k (access_log to a file, buffer=64k flush=1s) and HAProxy
# (option httplog to stdout, a file); rows 4KiB-log_*, next to the 4KiB_* rows with logs off.
#
# Needs: nginx, haproxy, wrk, curl, python3, openssl (installed from Debian's packages if
# missing, when run as root). Every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
SLOW_CLIENTS="${SLOW_CLIENTS:-1000}"
WORK="$(mktemp -d /tmp/mediaroute-compare.XXXXXX)"
chmod 755 "$WORK"   # nginx workers run as www-data
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need haproxy || ! need wrk || ! need curl || ! need python3 || ! need openssl; then
    echo "installing nginx-light haproxy wrk curl python3 openssl from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy wrk curl python3 openssl >/dev/null
fi
PATH="$PATH:/usr/sbin"
if [ -n "${PROFILE:-}" ] && ! need perf; then echo "PROFILE needs perf (linux-perf)"; exit 1; fi

# CPU 0: the proxy under test. CPU 1: origins and load generator (same for every proxy).
PROXY_CPU=0
LOAD_CPU=$(( $(nproc) > 1 ? 1 : 0 ))

P1=19101; P2=19102          # origins: primary, replica
MR=19181; NG=19182; NGD=19184; HA=19183; HAS=19188   # HAS: haproxy-splice
MRS=19185; NGS=19186; NGDS=19187          # TLS listeners: mediaroute, nginx-64k, nginx-default
MRL=19191; NGL=19192; HAL=19193           # access logs on: mediaroute, nginx-64k, haproxy

TESTS="${TESTS:-4k 1m 1g slow 4k-log}"
want() { [[ " $TESTS " == *" $1 "* ]]; }
TLS=0; if want 4k-tls || want 1g-tls; then TLS=1; fi

# MEDIAROUTE_BIN: measure a binary built elsewhere (another worktree or target dir), e.g. while
# the default target dir is busy with someone else's build.
if [ -n "${MEDIAROUTE_BIN:-}" ]; then
    MEDIAROUTE="$MEDIAROUTE_BIN"
    [ -x "$MEDIAROUTE" ] || { echo "MEDIAROUTE_BIN=$MEDIAROUTE is not an executable file"; exit 1; }
    echo "== using mediaroute at $MEDIAROUTE"
else
    echo "== building mediaroute (release)"
    cargo build --release --quiet
    MEDIAROUTE="$ROOT/target/release/mediaroute"
fi

echo "== preparing origin data in $WORK"
for side in primary replica; do
    # Path-style S3 layout: /{bucket}/{key}.
    mkdir -p "$WORK/$side/media"
    head -c 4096 /dev/urandom > "$WORK/$side/media/4k.bin"
    head -c $((1 << 20)) /dev/urandom > "$WORK/$side/media/1m.bin"
    truncate -s 1G "$WORK/$side/media/1g.bin"
    echo "$side" > "$WORK/$side/media/check.txt"
done

if [ "$TLS" = 1 ]; then
    # One certificate for both proxies: ECDSA P-256, self-signed, for 127.0.0.1 and localhost.
    # wrk verifies no certificate; curl is told -k.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=localhost" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" 2>/dev/null
fi

cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/origin-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile ${ORIGIN_SENDFILE:-on}; tcp_nopush on;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$P1 backlog=4096; root $WORK/primary; add_header X-Origin primary always; }
    server { listen 127.0.0.1:$P2 backlog=4096; root $WORK/replica; add_header X-Origin replica always; }
}
EOF

cat > "$WORK/mediaroute.toml" <<EOF
[listen]
addr = "127.0.0.1:$MR"
$([ "$TLS" = 1 ] && printf 'tls_addr = "127.0.0.1:%s"\ntls_cert = "%s"\ntls_key = "%s"' "$MRS" "$WORK/tls-cert.pem" "$WORK/tls-key.pem")
[identity]
trusted_proxies = ["127.0.0.0/8"]
[primary]
url = "http://127.0.0.1:$P1"
[replica]
url = "http://127.0.0.1:$P2"
[replication]
default_mode = "no"
networks = ["10.20.0.0/16"]
delay = "0s"
fallback = true
[users]
alice = "yes"
bob = "auto"
carol = "no"
[limits]
max_connections = 8000
[health]
interval = "1h"
[log]
level = "warn"
EOF
# The same proxy with its access log on: one line per request.
sed -e "s/^addr = .*/addr = \"127.0.0.1:$MRL\"/" -e '/^tls_/d' -e 's/^level = .*/level = "info"/' \
    "$WORK/mediaroute.toml" > "$WORK/mediaroute-log.toml"

# nginx with the same routing: realip (recursive), geo for the networks, map for users.
# With TLS tests, each server block also listens with TLS on a second port: one block, so the
# routing is the same by construction. Session cache and tickets are nginx's defaults.
nginx_server() { # port, TLS port, extra directives
    cat <<EOF
    server {
        listen 127.0.0.1:$1 backlog=4096;
EOF
    [ "$TLS" = 1 ] && cat <<EOF
        listen 127.0.0.1:$2 ssl backlog=4096;
        ssl_certificate $WORK/tls-cert.pem;
        ssl_certificate_key $WORK/tls-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
EOF
    cat <<EOF
        location / {
            proxy_pass http://\$pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-User "";
            $3
        }
    }
EOF
}
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8000; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream primary { server 127.0.0.1:$P1; keepalive 128; }
    upstream replica { server 127.0.0.1:$P2; keepalive 128; }
    set_real_ip_from 127.0.0.0/8;
    real_ip_header X-Forwarded-For;
    real_ip_recursive on;
    geo \$inside { default 0; 10.20.0.0/16 1; }
    map \$http_x_forwarded_user \$mode { default no; alice yes; bob auto; carol no; }
    map "\$request_method:\$mode:\$inside" \$pool {
        default primary;
        ~^(GET|HEAD):yes: replica;
        ~^(GET|HEAD):auto:1\$ replica;
    }
$(nginx_server $NG $NGS "proxy_buffer_size 64k; proxy_buffers 8 64k;")
$(nginx_server $NGD $NGDS "")
$(TLS=0 nginx_server $NGL - "proxy_buffer_size 64k; proxy_buffers 8 64k; access_log $WORK/nginx-access.log combined buffer=64k flush=1s;")
}
EOF

printf 'alice yes\nbob auto\ncarol no\n' > "$WORK/users.map"
printf '10.20.0.0/16\n' > "$WORK/networks.lst"
# One function writes both HAProxy configs, so haproxy-splice differs from haproxy only in the
# lines passed as extras.
haproxy_cfg() { # port, pid file, extra lines for global, extra lines for defaults
    cat <<EOF
global
    nbthread 1
    maxconn 5000
    pidfile $2
${3:+$3
}defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
${4:+$4
}frontend fe
    bind 127.0.0.1:$1
    http-request set-src hdr_ip(x-forwarded-for,-1) if { src 127.0.0.0/8 } { req.hdr(x-forwarded-for) -m found }
    http-request set-var(txn.mode) req.hdr(x-forwarded-user),map($WORK/users.map,no)
    http-request del-header x-forwarded-user
    acl read method GET HEAD
    acl yes var(txn.mode) -m str yes
    acl auto var(txn.mode) -m str auto
    acl inside src -f $WORK/networks.lst
    use_backend replica if read yes
    use_backend replica if read auto inside
    default_backend primary
backend primary
    server p 127.0.0.1:$P1 maxconn 0
backend replica
    server r 127.0.0.1:$P2 maxconn 0
EOF
}
haproxy_cfg "$HA" "$WORK/haproxy.pid" "" "" > "$WORK/haproxy.cfg"
# haproxy-splice: "option splice-auto" alone is not enough here: its heuristic waits for the
# response channel to be flagged a fast streamer, and on this machine (HAProxy 2.6.12) a 1 GiB
# download through it made 0 splice and ~66,000 recvfrom calls (perf stat on
# syscalls:sys_enter_splice). "option splice-response" splices every response body the H1 mux
# can (the 4 KiB responses arrive with their headers in one read and are still copied);
# splice-auto stays for the request direction, which these GETs do not use.
# maxpipes: HAProxy's default is maxconn/4 (1,250) and it falls back to copying when none is
# free; each slow download holds a full pipe while its client sleeps, so allow one per slow
# download plus the throughput tests' 64 connections. HAProxy raises its fd limit by two per
# pipe (2 x 5,000 + 2 x maxpipes stays under this machine's 20,000 hard limit at the default
# SLOW_CLIENTS). Pipes are created on demand, so unused ones cost nothing.
# tune.pipesize is left at the kernel default (64 KiB = 16 pages): the pipe is HAProxy's whole
# forwarding buffer in this mode, and 64 KiB is what nginx-64k and mediaroute read per step.
# Pipe pages are kernel memory, not RSS (like socket buffers): the RSS rows leave them out, and
# the slow test's pipes_open row shows how many were held. (Non-root users get 1-page pipes past
# fs.pipe-user-pages-soft, 16,384 pages here; the script runs as root, which is exempt.)
haproxy_cfg "$HAS" "$WORK/haproxy-splice.pid" \
    "    maxpipes $(( SLOW_CLIENTS + 64 ))" \
    "    option splice-auto
    option splice-response" > "$WORK/haproxy-splice.cfg"
# haproxy-log: HTTP access lines to stdout (a file here), written by HAProxy itself without
# blocking (it drops a line that cannot be written at once).
haproxy_cfg "$HAL" "$WORK/haproxy-log.pid" \
    "    log stdout format raw local0" \
    "    log global
    option httplog" > "$WORK/haproxy-log.cfg"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
start() { # name, cpu, command...
    local name="$1" cpu="$2"; shift 2
    taskset -c "$cpu" "$@" > "$WORK/$name.out" 2>&1 &
    PIDS+=("$!")
}
echo "== starting origins, mediaroute, nginx, haproxy"
start origin "$LOAD_CPU" nginx -c "$WORK/origin.conf" -g "daemon off;"
start mediaroute "$PROXY_CPU" "$MEDIAROUTE" run --config "$WORK/mediaroute.toml"
start nginx "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -g "daemon off;"
start haproxy "$PROXY_CPU" haproxy -f "$WORK/haproxy.cfg" -db
start haproxy-splice "$PROXY_CPU" haproxy -f "$WORK/haproxy-splice.cfg" -db
LOGS=0; if want 4k-log; then LOGS=1; fi
if [ "$LOGS" = 1 ]; then
    start mediaroute-log "$PROXY_CPU" "$MEDIAROUTE" run --config "$WORK/mediaroute-log.toml"
    start haproxy-log "$PROXY_CPU" haproxy -f "$WORK/haproxy-log.cfg" -db
fi
sleep 1.5
URLS=()
for port in $P1 $P2 $MR $NG $NGD $HA $HAS; do URLS+=("http://127.0.0.1:$port"); done
if [ "$LOGS" = 1 ]; then for port in $MRL $NGL $HAL; do URLS+=("http://127.0.0.1:$port"); done; fi
[ "$TLS" = 1 ] && for port in $MRS $NGS $NGDS; do URLS+=("https://127.0.0.1:$port"); done
for url in "${URLS[@]}"; do
    curl -skf -o /dev/null "$url/media/check.txt" || { echo "$url is not serving"; tail "$WORK"/*.out "$WORK"/*.log; ls -la "$WORK" "$WORK/primary"; exit 1; }
done

# Process ids per target, for CPU and memory accounting (master and workers).
tree_pids() { local p="$1"; echo "$p"; pgrep -P "$p" 2>/dev/null || true; }
declare -A PID_OF=( [mediaroute]="${PIDS[1]}" [nginx-64k]="${PIDS[2]}" [nginx-default]="${PIDS[2]}" [haproxy]="${PIDS[3]}" [haproxy-splice]="${PIDS[4]}" [direct]="${PIDS[0]}" )
declare -A PORT_OF=( [mediaroute]=$MR [nginx-64k]=$NG [nginx-default]=$NGD [haproxy]=$HA [haproxy-splice]=$HAS [direct]=$P2 )
declare -A TLS_PORT_OF=( [mediaroute]=$MRS [nginx-64k]=$NGS [nginx-default]=$NGDS )
# The twins with access logs on (4k-log): their port and process.
declare -A LOG_PORT_OF=( [mediaroute]=$MRL [nginx-64k]=$NGL [haproxy]=$HAL )
declare -A LOG_PID_OF=()
if [ "$LOGS" = 1 ]; then LOG_PID_OF=( [mediaroute]="${PIDS[5]}" [nginx-64k]="${PIDS[2]}" [haproxy]="${PIDS[6]}" ); fi
TARGETS=(direct mediaroute nginx-64k nginx-default haproxy haproxy-splice)
if [ -n "${ONLY:-}" ]; then read -r -a TARGETS <<< "$ONLY"; fi
PROXIES=()
for t in "${TARGETS[@]}"; do
    [ -n "${PORT_OF[$t]:-}" ] || { echo "ONLY: unknown target '$t' (known: ${!PORT_OF[*]})"; exit 1; }
    [ "$t" = direct ] || PROXIES+=("$t")
done
TICK=$(getconf CLK_TCK)
tree_sum() { # pid, file under /proc/PID, awk program printing one number: summed over the tree
    local total=0 p
    for p in $(tree_pids "$1"); do
        [ -r "/proc/$p/$2" ] || continue
        total=$(( total + $(awk "$3" "/proc/$p/$2") ))
    done
    echo "$total"
}
# The single-quoted $N below are awk's fields, not shell expansions.
# shellcheck disable=SC2016
cpu_ticks() { tree_sum "$1" stat '{print $14 + $15}'; }   # utime + stime
cpu_stat() { awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat; }   # busy (steal included), idle + iowait
# shellcheck disable=SC2016
rss_kib() { tree_sum "$1" status '/^VmRSS:/ {print $2}'; }
pipes_open() { # pid: distinct pipes the tree holds (spliced connections, plus a few internal ones)
    local p
    for p in $(tree_pids "$1"); do find "/proc/$p/fd" -lname 'pipe:*' -printf '%l\n' 2>/dev/null || true; done | sort -u | wc -l
}

echo "== routing check: every proxy must send each request to the same origin"
check_cases=(
    "alice||GET" "alice|198.51.100.1|GET" "bob|10.20.3.4|GET" "bob|198.51.100.1|GET"
    "carol|10.20.3.4|GET" "|10.20.3.4|GET" "zed||GET" "alice||PUT" "bob|10.20.3.4, 198.51.100.2|GET"
)
# One column per selected proxy (ONLY), in the same order as the row values below.
printf '%-34s' "user|xff|method"; printf ' %-14s' "${PROXIES[@]}"; echo
mismatch=0
for c in "${check_cases[@]}"; do
    IFS='|' read -r user xff method <<< "$c"
    row=()
    for t in "${PROXIES[@]}"; do
        args=(-s -o /dev/null -D - -X "$method" "http://127.0.0.1:${PORT_OF[$t]}/media/check.txt")
        [ -n "$user" ] && args+=(-H "X-Forwarded-User: $user")
        [ -n "$xff" ] && args+=(-H "X-Forwarded-For: $xff")
        # Every origin answer, errors included, names its side in X-Origin.
        body=$(curl "${args[@]}" 2>/dev/null | tr -d '\r' | awk -F': ' 'tolower($1) == "x-origin" {print $2}')
        row+=("$body")
    done
    printf '%-34s' "$c"; printf ' %-14s' "${row[@]}"; echo
    for r in "${row[@]}"; do [ "$r" = "${row[0]}" ] || mismatch=1; done
done
[ "$mismatch" = 0 ] || { echo "routing differs between proxies: stop"; exit 1; }

if [ "$TLS" = 1 ]; then
    echo "== TLS: each TLS listener routes like its plain one; what a client without ALPN (as wrk) and one offering h2 get"
    for t in "${PROXIES[@]}"; do
        [ -n "${TLS_PORT_OF[$t]:-}" ] || { echo " - $t: no TLS listener in this script, no TLS rows"; continue; }
        for c in "${check_cases[@]}"; do
            IFS='|' read -r user xff method <<< "$c"
            for scheme_port in "http ${PORT_OF[$t]}" "https ${TLS_PORT_OF[$t]}"; do
                read -r scheme port <<< "$scheme_port"
                args=(-sk -o /dev/null -D - -X "$method" "$scheme://127.0.0.1:$port/media/check.txt")
                [ -n "$user" ] && args+=(-H "X-Forwarded-User: $user")
                [ -n "$xff" ] && args+=(-H "X-Forwarded-For: $xff")
                origin=$(curl "${args[@]}" 2>/dev/null | tr -d '\r' | awk -F': ' 'tolower($1) == "x-origin" {print $2}')
                if [ "$scheme" = http ]; then plain="$origin"; elif [ "$origin" != "$plain" ]; then
                    echo "$t over TLS sends $c to '$origin', over plain HTTP to '$plain': stop"; exit 1
                fi
            done
        done
        hs=$(openssl s_client -connect "127.0.0.1:${TLS_PORT_OF[$t]}" -servername localhost </dev/null 2>/dev/null)
        h2=$(openssl s_client -connect "127.0.0.1:${TLS_PORT_OF[$t]}" -servername localhost -alpn h2,http/1.1 </dev/null 2>/dev/null)
        v12=$(openssl s_client -connect "127.0.0.1:${TLS_PORT_OF[$t]}" -servername localhost -tls1_2 </dev/null 2>/dev/null)
        printf ' - %s: routing as plain; no ALPN: %s; ALPN h2,http/1.1: %s; TLS 1.2: %s\n' "$t" \
            "$(awk '/^New,/ {print $2, $NF}' <<< "$hs" | tr -d ,)" \
            "$(awk -F': *' '/^ALPN protocol/ {print $2} /^No ALPN/ {print "none"}' <<< "$h2")" \
            "$(awk '/^New,/ {print $2, $NF}' <<< "$v12" | tr -d ,)"
        printf '   curl, ALPN h2: HTTP/%s\n' "$(curl -sk --http2 -o /dev/null -w '%{http_version}' -H 'X-Forwarded-User: alice' "https://127.0.0.1:${TLS_PORT_OF[$t]}/media/check.txt")"
    done
fi

cat > "$WORK/alice.lua" <<'EOF'
wrk.headers["X-Forwarded-User"] = "alice"
EOF

# Results: one line per measurement, "metric target value round". The round number lets the
# summary pair mediaroute's round-k value with a peer's round-k value; an empty value (a test
# that printed no number) is written as "-" so the fields stay aligned, and the summary skips it.
RESULTS="$WORK/results.txt"
: > "$RESULTS"
ROUND=0
record() { echo "$1 $2 ${3:--} $ROUND" >> "$RESULTS"; }

run_wrk() { # target, path, connections, tag, base URL, pid -> records rps, p99_ms, mbps, cpu_us_per_req
    local t="$1" path="$2" conns="$3" tag="$4" base="${5:-http://127.0.0.1:${PORT_OF[$1]}}"
    local pid="${6:-${PID_OF[$t]}}" before after out load_before load_after
    before=$(cpu_ticks "$pid")
    load_before=$(cpu_stat "$LOAD_CPU")
    # Direct runs give the load generator the proxy's idle CPU, so both sides have two.
    local cpu="$LOAD_CPU"; [ "$t" = direct ] && cpu="$PROXY_CPU"
    local perf_pid=""
    if [ -n "${PROFILE:-}" ]; then
        mkdir -p "$PROFILE"
        perf record -a -g -F 999 -o "$PROFILE/$t-$tag-r$ROUND.data" -- sleep "$DURATION" > /dev/null 2>&1 &
        perf_pid=$!
    fi
    out=$(taskset -c "$cpu" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 30s --latency -s "$WORK/alice.lua" "$base$path")
    [ -z "$perf_pid" ] || wait "$perf_pid" || true
    after=$(cpu_ticks "$pid")
    load_after=$(cpu_stat "$LOAD_CPU")
    local rps p99 reqs mbps errors
    rps=$(awk '/^Requests\/sec/ {print $2}' <<< "$out")
    reqs=$(awk '/requests in/ {print $1}' <<< "$out")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<< "$out")
    mbps=$(awk '/^Transfer\/sec/ {v=$2; if (v ~ /GB$/) {sub(/GB/,"",v); v*=1024} else if (v ~ /MB$/) {sub(/MB/,"",v)} else if (v ~ /KB$/) {sub(/KB/,"",v); v/=1024}; print v}' <<< "$out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<< "$out")
    [ -z "$errors" ] || echo "   $t $tag: $errors"
    record "${tag}_MiBps" "$t" "$mbps"
    if [ "$t" != direct ]; then
        # How busy CPU 1 (origins and wrk) was: near 100, the load side and not the proxy may be the limit.
        record "${tag}_load_cpu_busy_pct" "$t" "$(awk -v a="$load_before" -v b="$load_after" 'BEGIN {split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.0f", 100 * busy / (busy + idle)}')"
    fi
    if [[ "$tag" != 1GiB* ]]; then
        record "${tag}_rps" "$t" "$rps"
        record "${tag}_p99_ms" "$t" "$p99"
    fi
    if [ "$t" != direct ] && [[ "$tag" = 1GiB* ]]; then
        # CPU seconds per GiB moved.
        record "${tag}_cpu_s_per_GiB" "$t" "$(awk -v d=$((after - before)) -v m="$mbps" -v s="$DURATION" -v tk="$TICK" 'BEGIN {printf "%.3f", (d / tk) / (m * s / 1024)}')"
    elif [ "$t" != direct ]; then
        record "${tag}_cpu_us_per_req" "$t" "$(awk -v d=$((after - before)) -v n="$reqs" -v tk="$TICK" 'BEGIN {printf "%.2f", d / tk * 1e6 / n}')"
    fi
}


cat > "$WORK/slow.py" <<'EOF'
# Opens N connections, each downloading the 1 GiB object slowly (16 KiB per 200 ms),
# holds them for HOLD seconds, then exits.
import asyncio, sys
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def one():
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /media/1g.bin HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: alice\r\n\r\n")
        await w.drain()
        while True:
            await r.read(16384)
            await asyncio.sleep(0.2)
    except Exception:
        pass
async def main():
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(hold)
    for t in tasks: t.cancel()
asyncio.run(main())
EOF

declare -A SLOW_BASE=()   # pid -> its idle RSS (KiB) right before its first slow downloads
run_slow() { # target: RSS with SLOW_CLIENTS slow downloads in flight, and per download
    local t="$1" pid="${PID_OF[$1]}" peak=0 pipes=0 idle base r p
    # Idle RSS of the same process right before the clients connect, not at start-up: the
    # throughput tests above have grown every heap by different amounts.
    idle=$(rss_kib "$pid")
    # The per-download figure is taken against the idle RSS before the process's first slow
    # round, not before this round: allocators keep what the previous round's connections
    # freed (mediaroute, 200 clients: idle 22 MiB before round 1, 82 MiB before round 2, peak
    # 78 and 81 MiB), so against its own round's idle a later round reuses that memory and
    # shows about 0 KiB per download. Keyed by PID: nginx-64k and nginx-default are one
    # process, and nginx-default's baseline is nginx's before any slow download reached it.
    base="${SLOW_BASE[$pid]:-$idle}"
    SLOW_BASE[$pid]=$base
    taskset -c "$LOAD_CPU" python3 "$WORK/slow.py" "${PORT_OF[$t]}" "$SLOW_CLIENTS" 12 &
    local spid=$!
    for _ in $(seq 1 10); do
        sleep 1
        r=$(rss_kib "$pid"); [ "$r" -gt "$peak" ] && peak=$r
        p=$(pipes_open "$pid"); [ "$p" -gt "$pipes" ] && pipes=$p
    done
    wait "$spid" || true
    record "slow${SLOW_CLIENTS}_rss_MiB" "$t" "$(awk -v k="$peak" 'BEGIN {printf "%.1f", k / 1024}')"
    record "slow${SLOW_CLIENTS}_rss_idle_MiB" "$t" "$(awk -v k="$idle" 'BEGIN {printf "%.1f", k / 1024}')"
    record "slow${SLOW_CLIENTS}_rss_per_download_KiB" "$t" "$(awk -v a="$peak" -v b="$base" -v n="$SLOW_CLIENTS" 'BEGIN {printf "%.1f", (a - b) / n}')"
    # Not a cost to compare (pipe pages are kernel memory, outside RSS): shows whether a proxy
    # spliced, i.e. held one pipe per slow download.
    record "slow${SLOW_CLIENTS}_pipes_open" "$t" "$pipes"
    echo "   $t: RSS idle $((idle / 1024)) MiB (before the first slow round $((base / 1024))), with $SLOW_CLIENTS slow downloads $((peak / 1024)) MiB, $(( (peak - base) / SLOW_CLIENTS )) KiB each; $pipes pipes open"
    sleep 2
}

for round in $(seq 1 "$ROUNDS"); do
    ROUND=$round
    echo "== round $round of $ROUNDS"
    for t in "${TARGETS[@]}"; do
        echo " - $t"
        if want 4k; then run_wrk "$t" /media/4k.bin 64 4KiB; fi
        if want 1m; then run_wrk "$t" /media/1m.bin 8 1MiB; fi
        if want 1g; then run_wrk "$t" /media/1g.bin 1 1GiB; fi
        if [ -n "${TLS_PORT_OF[$t]:-}" ]; then
            tls="https://127.0.0.1:${TLS_PORT_OF[$t]}"
            if want 4k-tls; then run_wrk "$t" /media/4k.bin 64 4KiB-TLS "$tls"; fi
            if want 1g-tls; then run_wrk "$t" /media/1g.bin 1 1GiB-TLS "$tls"; fi
        fi
        if [ "$LOGS" = 1 ] && [ -n "${LOG_PORT_OF[$t]:-}" ]; then
            run_wrk "$t" /media/4k.bin 64 4KiB-log "http://127.0.0.1:${LOG_PORT_OF[$t]}" "${LOG_PID_OF[$t]}"
        fi
    done
done
# The slow-download rounds come last: 1,000 connections per proxy with full socket buffers
# leave the kernel (TIME_WAIT, TCP memory) and every process's heap disturbed for a while,
# and the throughput tests above should not depend on which proxy's slow test ran before.
if want slow; then
    for round in $(seq 1 "$ROUNDS"); do
        ROUND=$round
        echo "== slow downloads, round $round of $ROUNDS"
        for t in "${PROXIES[@]}"; do run_slow "$t"; done
    done
fi

if [ "$LOGS" = 1 ]; then
    # nginx flushes its buffer within a second.
    sleep 1.5
    echo "== access lines written with logs on (one per request; mediaroute's file also has its start-up lines):"
    for f in mediaroute-log.out nginx-access.log haproxy-log.out; do
        if [ -f "$WORK/$f" ]; then echo "   $f: $(wc -l < "$WORK/$f") lines, the last: $(tail -n 1 "$WORK/$f" | cut -c1-200)"; fi
    done
fi
# What the proxies wrote (mediaroute logs at warn, nginx and HAProxy their errors).
for f in mediaroute.out nginx.out nginx-error.log haproxy.out haproxy-splice.out; do
    [ -s "$WORK/$f" ] || continue
    echo "== $f: $(wc -l < "$WORK/$f") lines, the last 5:"
    tail -n 5 "$WORK/$f" | cut -c1-300
done

echo
echo "== results: median of $ROUNDS rounds (min-max), ratios against direct and the best peer"
python3 - "$RESULTS" <<'EOF'
import statistics, sys, collections
vals = collections.defaultdict(dict)   # (metric, target) -> {round: value}
for line in open(sys.argv[1]):
    m, t, v, k = line.split()
    try:
        vals[(m, t)][int(k)] = float(v)
    except ValueError:
        pass
metrics = sorted({m for m, _ in vals}, key=lambda m: (m.split("_")[0], m))
# Columns: the targets that ran, in the usual order (any other name after them).
order = ["direct", "mediaroute", "nginx-64k", "nginx-default", "haproxy", "haproxy-splice"]
ran = {t for _, t in vals}
targets = [t for t in order if t in ran] + sorted(ran - set(order))
# Peers: every target that ran other than mediaroute and direct (haproxy-splice included).
peers = [t for t in targets if t not in ("direct", "mediaroute")]
ratio_cols = [t for t in targets if t != "mediaroute"]
higher_is_better = lambda m: m.endswith("rps") or m.endswith("MiBps")
info_only = lambda m: m.endswith("_pct") or m.endswith("_pipes_open")   # no ratios for these
print(f"| metric | {' | '.join(targets)} | " + " | ".join(f"mediaroute / {t}" for t in ratio_cols) + " | mediaroute / best peer |")
print("|" + "---|" * (len(targets) + len(ratio_cols) + 2))
for m in metrics:
    cells, med = [], {}
    for t in targets:
        xs = list(vals.get((m, t), {}).values())
        if not xs:
            cells.append("")
            continue
        med[t] = statistics.median(xs)
        cells.append(f"{med[t]:.4g} ({min(xs):.4g}-{max(xs):.4g})" if len(xs) > 1 else f"{med[t]:.4g}")
    mr = med.get("mediaroute")
    ok = lambda t: mr is not None and med.get(t, 0) > 0 and not info_only(m)
    ratios = [f"{mr / med[t]:.2f}" if ok(t) else "" for t in ratio_cols]
    vs_peer = ""
    candidates = [t for t in peers if ok(t)]
    if candidates:
        pick = max if higher_is_better(m) else min
        best = pick(candidates, key=lambda t: med[t])
        vs_peer = f"{mr / med[best]:.2f}"
        # Spread across rounds: mediaroute's round-k value / that same peer's round-k value.
        mine, theirs = vals[(m, "mediaroute")], vals[(m, best)]
        per_round = [mine[k] / theirs[k] for k in sorted(mine.keys() & theirs.keys()) if theirs[k] > 0]
        if len(per_round) > 1:
            vs_peer += f" ({min(per_round):.2f}-{max(per_round):.2f})"
        vs_peer += f" {best}"
    print(f"| {m} | {' | '.join(cells)} | {' | '.join(ratios)} | {vs_peer} |")
print()
print("Higher is better for rps and MiBps; lower for p99, CPU and RSS. Ratios are mediaroute / other.")
print("mediaroute / best peer: against the peer (named) with the best median in that row, among all")
print("  non-direct targets that ran; in brackets the min-max over rounds of mediaroute's round-k value /")
print("  that peer's round-k value.")
print("slowN_rss_per_download_KiB: (RSS with N slow downloads in flight - RSS of the same process idle")
print("  just before its first slow round) / N; slowN_rss_idle_MiB: idle RSS just before each round (later")
print("  rounds include what allocators kept from the earlier ones). RSS leaves out kernel memory: socket")
print("  buffers, and the pipes of spliced connections (up to 64 KiB each); slowN_pipes_open shows how")
print("  many pipes a proxy held.")
print("load_cpu_busy_pct: how busy CPU 1 (origins and wrk) was; near 100, the load side may be the limit.")
EOF
