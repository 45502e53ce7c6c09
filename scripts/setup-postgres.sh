#!/usr/bin/env bash
# A PostgreSQL server with pgvector for thinkrag's scale-out store, from Debian packages alone
# (../shared/reference/scale-out.md): bookworm's postgresql-15, and pgvector built from Debian
# trixie's source package against it (bookworm has no pgvector package; trixie's binary needs a
# newer glibc). The system's apt lists are left untouched: the trixie source entry lives in a
# private list.
#
#   scripts/setup-postgres.sh install            # packages + pgvector (idempotent; root or sudo)
#   scripts/setup-postgres.sh start DIR PORT     # a fresh cluster in DIR on 127.0.0.1:PORT; prints its URL
#   scripts/setup-postgres.sh stop DIR           # stops it
set -euo pipefail

PG_MAJOR=15
PGVECTOR_VERSION=0.8.0
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the postgres user (initdb and the server refuse to run as root).
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install() {
    local missing=()
    # openssl: the TLS tests make their own CA and server certificate with it.
    for pkg in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR build-essential dpkg-dev openssl; do
        # Not `dpkg -s`: it succeeds for a package removed but not purged ("deinstall ok
        # config-files"), which is how fresh machines of this kind carry postgresql-15.
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
            || { as_root apt-get update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; }
    fi
    for bin in pg_ctl initdb postgres pg_config psql; do
        [ -x "$PG_BIN/$bin" ] || { echo "PostgreSQL $PG_MAJOR is still missing $PG_BIN/$bin after installing" >&2; exit 1; }
    done
    local pkglibdir
    pkglibdir=$("$PG_BIN/pg_config" --pkglibdir)
    if [ -f "$pkglibdir/vector.so" ]; then
        echo "pgvector: already installed in $pkglibdir"
        return
    fi
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    # A private source list (trixie's deb-src, same mirror and key as the system's bookworm).
    mkdir -p "$work/lists/partial" "$work/etc"
    cat > "$work/etc/trixie-src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    local opts=(-o "Dir::Etc::sourcelist=-" -o "Dir::Etc::sourceparts=$work/etc" -o "Dir::State::Lists=$work/lists")
    apt-get "${opts[@]}" update -qq
    (cd "$work" && apt-get "${opts[@]}" source --download-only "pgvector=$PGVECTOR_VERSION-1" >/dev/null)
    tar -xzf "$work"/pgvector_"$PGVECTOR_VERSION".orig.tar.gz -C "$work"
    local src
    src=$(find "$work" -maxdepth 1 -type d -name "pgvector-*" | head -1)
    # OPTFLAGS="": no -march=native, so the library runs on any x86-64 this cluster moves to.
    make -C "$src" -s OPTFLAGS="" PG_CONFIG="$PG_BIN/pg_config" >/dev/null
    as_root make -C "$src" -s OPTFLAGS="" PG_CONFIG="$PG_BIN/pg_config" install >/dev/null
    echo "pgvector $PGVECTOR_VERSION: installed in $pkglibdir"
}

start() {
    local dir=${1:?usage: start DIR PORT} port=${2:?usage: start DIR PORT}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/PG_VERSION" ]; then
        as_postgres "$PG_BIN/initdb" -A trust -U postgres -D "$dir" >/dev/null
    fi
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >/dev/null
    "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -qAt -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
    echo "postgres://postgres@127.0.0.1:$port/postgres"
}

stop() {
    local dir=${1:?usage: stop DIR}
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    *) echo "usage: $0 install | start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
