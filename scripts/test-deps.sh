#!/usr/bin/env bash
# What the tests need beyond the virtualenv, set up or checked before they run.
#   scripts/test-deps.sh fast   (make test): PostgreSQL on 127.0.0.1:5432 (the callback store's tests)
#   scripts/test-deps.sh all    (make test-all): also Redis on 127.0.0.1:6379 (Celery) and Debian's
#                               chromium (the browser test), installed with apt-get when missing
# Services are started with this machine's own commands when they do not answer. Nothing is
# skipped when something is missing: the tests that need it fail and say why.
set -uo pipefail
TIER=${1:-all}

answers() { python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))))' "$1"; }

if [ "$TIER" = all ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium (the browser test drives it)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/imagecb-apt.log 2>&1 \
      || echo "!! could not install chromium (see /tmp/imagecb-apt.log): the browser test will fail" >&2
  else
    echo "!! chromium is not installed (apt-get install chromium): the browser test will fail" >&2
  fi
fi

if ! answers 5432; then
  echo "== PostgreSQL does not answer on 127.0.0.1:5432: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql 2>/dev/null | head -1)" main start 2>&1 | tail -2 || true
fi
if [ "$TIER" = all ] && ! answers 6379; then
  echo "== Redis does not answer on 127.0.0.1:6379: starting it"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log 2>&1 | tail -2 || true
fi
for _ in $(seq 20); do answers 5432 && { [ "$TIER" != all ] || answers 6379; } && break; sleep 0.5; done
answers 5432 || echo "!! PostgreSQL still does not answer: the tests that need it will fail" >&2
[ "$TIER" != all ] || answers 6379 || echo "!! Redis still does not answer: the Celery tests will fail" >&2
mkdir -p artifacts/screenshots
exit 0
