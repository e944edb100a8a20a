#!/bin/sh
# Installs the Debian packages the macro benchmarks (the harnesses of bench/harness: sni for
# sni-proxy, dns and dns_fastpath for node-local-dns) and the privileged tests (network namespaces
# via iproute2, node-local-dns interception via iptables, unbound for its differential test)
# need, and clang/llvm/libbpf-dev for ebpf/build.sh (the objects are in the repository; the
# test suite only checks that they match a fresh compile), and bpftool, through which
# dns_fastpath reads the attached programs' run time (BPF_ENABLE_STATS).
# Idempotent and quiet: does nothing when every package is already installed.
# `install-deps.sh --rathole` also installs rathole (the tunnel harness's peer) from crates.io
# into ~/.cache/gardener-agents/rathole (TLS transport; needs cargo and libssl-dev), under the
# shared build lock; run it before the harness, which may itself hold that lock. Not --locked:
# rathole 0.5.0's lock file pins time 0.3.29, which no longer compiles (Rust >= 1.80).
# Never starts or depends on systemd; services that the packages' postinst
# scripts start are stopped afterwards (the harness runs its own instances on
# random high ports).
set -eu

if [ "${1:-}" = "--rathole" ]; then
    root="${GARDENER_AGENTS_CACHE:-$HOME/.cache/gardener-agents}/rathole"
    if [ ! -x "$root/bin/rathole" ]; then
        echo "install-deps.sh: cargo install rathole --root $root" >&2
        flock /tmp/gardener-build.lock cargo install rathole --root "$root"
    fi
    shift
fi

PKGS="haproxy nginx libnginx-mod-stream sniproxy wrk curl openssl util-linux iptables iproute2
      knot dnsperf unbound pdns-recursor knot-resolver dnsmasq clang llvm libbpf-dev bpftool"

missing=""
for p in $PKGS; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: missing packages:$missing (run as root, or install them yourself)" >&2
    exit 1
fi

echo "install-deps.sh: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 = "do not start services from maintainer scripts".
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
trap 'if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT

apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null

# In case something started anyway (no systemd here: SysV scripts or nothing).
# The DNS servers matter most: one left on port 53 would break the test suite.
for svc in nginx haproxy sniproxy knot unbound pdns-recursor dnsmasq kresd; do
    if [ -x "/etc/init.d/$svc" ]; then
        service "$svc" stop >/dev/null 2>&1 || "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for unit in knot unbound pdns-recursor dnsmasq kresd@1 kres-cache-gc; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi
if command -v update-rc.d >/dev/null 2>&1; then
    for svc in knot unbound pdns-recursor dnsmasq; do
        [ -x "/etc/init.d/$svc" ] && update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
fi
exit 0
