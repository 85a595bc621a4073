#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on 127.0.0.1 before the tests run: starts them
# if they are installed but stopped, installs them from Debian's packages if missing.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  local host=$1 port=$2 name=$3
  for _ in $(seq 1 60); do
    if answers "$host" "$port"; then return 0; fi
    sleep 0.5
  done
  echo "ensure_services: $name is not answering on $host:$port" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

if ! answers "$PG_HOST" "$PG_PORT"; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "ensure_services: installing PostgreSQL"
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "ensure_services: starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for "$PG_HOST" "$PG_PORT" PostgreSQL
fi

# The tests connect as postgres over TCP without a password (TEST_DATABASE_URL). A fresh
# Debian cluster asks for one on 127.0.0.1: trust local TCP logins instead (this is a
# test machine) and make the database the tests connect to.
as_postgres() { as_root runuser -u postgres -- "$@"; }
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -qAtc 'select 1' \
    >/dev/null 2>&1; then
  hba=$(as_postgres psql -qAtc 'show hba_file')
  echo "ensure_services: trusting local TCP logins in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_postgres psql -qAtc 'select pg_reload_conf()' >/dev/null
fi
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -qAtc 'select 1' test >/dev/null 2>&1; then
  createdb -h "$PG_HOST" -p "$PG_PORT" -U postgres -w test
fi

if ! answers 127.0.0.1 "$REDIS_PORT"; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure_services: installing Redis"
    apt_install redis-server
  fi
  echo "ensure_services: starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 127.0.0.1 "$REDIS_PORT" Redis
fi

# The browser tests drive Debian's Chromium through chromedriver (no browser download).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "ensure_services: installing chromium and chromium-driver"
  apt_install chromium chromium-driver
fi

# The Pusher client tests (tests/test_pusher_js.py, tests/browser/test_pusher_browser.py)
# run pusher-js and Laravel Echo from npm, at the versions tests/pusher_js/package-lock.json
# pins: `npm ci` again whenever that file changes (a stamp named by its hash).
pusher_js=tests/pusher_js
if command -v npm >/dev/null 2>&1; then
  stamp="$pusher_js/node_modules/.installed-$(sha1sum "$pusher_js/package-lock.json" | cut -c1-12)"
  if [ ! -e "$stamp" ]; then
    echo "ensure_services: npm ci in $pusher_js"
    (cd "$pusher_js" && npm ci --no-audit --no-fund --loglevel=error)
    touch "$stamp"
  fi
else
  echo "ensure_services: no npm: the Pusher client tests skip (fail in CI); install Node.js 20+"
fi

# The deployment tests check deploy/prometheus*.yml with promtool, taken from Debian's
# prometheus package without installing (or starting) the Prometheus server itself.
if ! command -v promtool >/dev/null 2>&1; then
  echo "ensure_services: installing promtool"
  as_root apt-get update -qq
  promtool_dir=$(mktemp -d)
  # apt would fetch as its _apt user, who cannot write to this private folder.
  (cd "$promtool_dir" && apt-get download -qq -o APT::Sandbox::User=root prometheus)
  dpkg-deb --fsys-tarfile "$promtool_dir"/prometheus_*.deb \
    | tar -x -C "$promtool_dir" ./usr/bin/promtool
  as_root install -m 0755 "$promtool_dir/usr/bin/promtool" /usr/local/bin/promtool
  rm -rf "$promtool_dir"
fi

# nginx -t checks deploy/nginx/ in the deployment tests; only the binary is used.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "ensure_services: installing nginx"
  apt_install nginx
fi
