#!/usr/bin/env bash
# What `make test` needs beyond the virtualenv, set up or checked before the tests run:
# - Chromium (Debian's `chromium`) for the browser test: installed when missing (apt-get, as root);
# - PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 for the real-stack tests: started
#   with this machine's own commands when they do not answer.
# Nothing is skipped when something is missing: the tests that need it fail and say why.
set -uo pipefail

answers() { python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))))' "$1"; }

if ! command -v chromium >/dev/null 2>&1; then
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
if ! answers 6379; then
  echo "== Redis does not answer on 127.0.0.1:6379: starting it"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log 2>&1 | tail -2 || true
fi
for _ in $(seq 20); do answers 5432 && answers 6379 && break; sleep 0.5; done
answers 5432 || echo "!! PostgreSQL still does not answer: the real-stack tests will fail" >&2
answers 6379 || echo "!! Redis still does not answer: the Celery tests will fail" >&2
mkdir -p artifacts/screenshots
exit 0
