#!/usr/bin/env bash
# Everything the Docker tests need on a Debian 12 host, as root, idempotent and quick the second time:
#   1. a Docker engine with the buildx and compose plugins, started and answering;
#   2. a local base image (debootstrap + docker import), since no image can be pulled here;
#   3. a wheelhouse of the pinned requirement sets, for offline image builds, every wheel checked against
#      build/wheelhouse-lock.txt (sha256; written by docker/lock_wheelhouse.py);
#   4. an OCI registry on loopback (Debian 12's docker-registry, storage in the cache), for push and pull;
#      only one this script started is used (root's docker-registry serving this script's config; its pid
#      is recorded), never whatever else answers on that port, and the Debian package's own service (every
#      interface, :5000) never runs;
#   5. a second engine, "another builder": its own dockerd with the containerd image store, socket, data and
#      bridge, sharing nothing with the first but the registry (the cross-builder cache test, provenance,
#      multi-platform images);
#   6. linux/arm64 under emulation: qemu-user-static registered with the kernel's binfmt_misc, an arm64 base
#      image made the way the amd64 one is, the arm64 wheels of the run-time set and OpenVINO
#      (build/wheelhouse-lock-arm64.txt), and both base images as one two-platform index in the registry
#      (MODELBAKE_MULTI_BASE). When the kernel refuses, MODELBAKE_ARM64 says why in one line (the arm64
#      tests then fail with it under CI);
#   7. free disk: when less than a run needs is free, the build caches are pruned first (make_room).
# Prints the variables the build needs as `export` lines (eval "$(bash docker/setup-engine.sh)").
#
# Why not Debian 12's docker.io alone: its engine (20.10) embeds a BuildKit too old for named contexts,
# and Debian 12 has no buildx. Debian 13 ships dockerd 26, buildx 0.13 and compose v2 as .debs whose
# binaries run on Debian 12 with its containerd and runc; we fetch them with a private apt list so the
# system's apt setup stays untouched.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${MODELBAKE_CACHE:-$HOME/.cache/modelbake}
base_image=${MODELBAKE_BASE_IMAGE:-modelbake/debian-base:bookworm}
wheelhouse=${MODELBAKE_WHEELHOUSE:-$cache/wheelhouse}
suite_base=bookworm
plugins=/usr/libexec/docker/cli-plugins
mkdir -p "$cache"

say() { printf '[setup-engine] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts dockerd)"

registry=${MODELBAKE_REGISTRY:-127.0.0.1:5055}
# The registry speaks plain HTTP without authentication: loopback only, checked before anything is done.
case $registry in
  127.*:[0-9]*|localhost:[0-9]*) ;;
  *) die "MODELBAKE_REGISTRY=$registry: not a loopback host:port; the test registry has no authentication, so it listens on loopback only (e.g. 127.0.0.1:5055)" ;;
esac
registry_pidfile=$cache/registry.pid

debian_mirror() {
  # The mirror this machine's apt already uses, so no host name is hard-coded here.
  local uri
  uri=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "no Debian mirror found in the apt sources; add one for $suite_base"
  printf '%s\n' "$uri"
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  [ $apt_updated = 1 ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

trixie_fetch() {
  # Debian 13 packages unpacked once into the cache (a private apt list: the system's apt setup stays
  # untouched). $1: a file they hold, present once fetched; the rest: the packages. Prints the unpacked root.
  local dir=$cache/trixie want=$1; shift
  if [ ! -e "$dir/root/$want" ]; then
    say "fetching $* from Debian 13"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) trixie main" >"$dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$dir/debs" && apt-get "${opts[@]}" download "$@" >/dev/null)
    local pkg
    for pkg in "$@"; do dpkg-deb -x "$(ls "$dir"/debs/"${pkg}"_*.deb | tail -1)" "$dir/root"; done
    [ -e "$dir/root/$want" ] || die "Debian 13's $* did not bring $want"
  fi
  printf '%s\n' "$dir/root"
}

trixie_root() {
  # Debian 13's docker.io (dockerd 26), docker-buildx and docker-compose.
  trixie_fetch usr/libexec/docker/cli-plugins/docker-buildx docker.io docker-buildx docker-compose
}

engine_ok() { timeout 10 docker info >/dev/null 2>&1 && timeout 10 docker buildx version >/dev/null 2>&1; }

setup_engine() {
  # Debian 12's docker.io brings containerd, runc, iptables and a client; dockerd 26 and the plugins come
  # from Debian 13 (unpacked once into the cache).
  apt_install docker.io debootstrap ca-certificates iptables
  local root; root=$(trixie_root)
  install -d "$plugins"
  for plugin in docker-buildx docker-compose; do
    cmp -s "$root/usr/libexec/docker/cli-plugins/$plugin" "$plugins/$plugin" \
      || install -m 0755 "$root/usr/libexec/docker/cli-plugins/$plugin" "$plugins/"
  done
  # `docker-compose build` as well as `docker compose build`: compose v2 runs standalone too.
  ln -sf "$plugins/docker-compose" /usr/local/bin/docker-compose
  if ! timeout 10 docker info >/dev/null 2>&1; then
    # BuildKit's cache grows with every distinct build (the wheelhouse context alone is 3 GB a copy) and
    # filled this kind of disk more than once: an explicit garbage-collection policy keeps it bounded. At
    # 20 GB it pruned stage results mid-suite (the torch venv layer is 6.3 GB, each wheelhouse copy 3.2 GB),
    # and reran stages then disagreed with images built before.
    printf '{"builder": {"gc": {"enabled": true, "defaultKeepStorage": "%s"}}}\n' "${MODELBAKE_BUILD_CACHE:-40GB}" \
      >"$cache/daemon.json"
    say "starting dockerd (log: $cache/dockerd.log, build cache kept under ${MODELBAKE_BUILD_CACHE:-40GB})"
    PATH="$root/usr/sbin:$root/usr/bin:$PATH" nohup dockerd --config-file "$cache/daemon.json" \
      >"$cache/dockerd.log" 2>&1 &
    for _ in $(seq 60); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  engine_ok || { tail -20 "$cache/dockerd.log" >&2 || true; die "dockerd did not answer within 60 s (log above)"; }
  say "engine: $(docker version --format 'server {{.Server.Version}}'), $(docker buildx version | cut -d' ' -f1-2)"
}

setup_base_image() {
  if docker image inspect "$base_image" >/dev/null 2>&1; then say "base image $base_image present"; return; fi
  local tarball=$cache/rootfs-$suite_base.tar
  if [ ! -s "$tarball" ]; then
    apt_install debootstrap
    local rootfs=$cache/rootfs-$suite_base
    say "debootstrap $suite_base (about a minute)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite_base" "$rootfs" "$(debian_mirror)" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "docker import $base_image"
  docker import "$tarball" "$base_image" >/dev/null
}

setup_wheelhouse() {
  # Hash-locked: pip refuses any wheel whose sha256 is not the lock's, and downloads nothing the lock does
  # not name (--no-deps; the lock holds the whole resolved set).
  local lock=$here/build/wheelhouse-lock.txt stamp=$wheelhouse/.lock.sha256 want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then say "wheelhouse up to date"; return; fi
  say "pip download into the wheelhouse, every wheel checked against its locked sha256 (several GB the first time)"
  mkdir -p "$wheelhouse"
  python3 -m pip download -q --only-binary=:all: --no-deps --require-hashes -d "$wheelhouse" -r "$lock" \
    2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" >"$stamp"
}

registry_up() {
  python3 -c "import sys, urllib.request; urllib.request.urlopen('http://$1/v2/', timeout=3)" 2>/dev/null
}

listener_pid() {
  # The pid of the process listening on TCP port $1, if any.
  { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; } || true
}

registry_ours() {
  # The listener on the registry's port is a docker-registry this script started, not whatever a local user
  # started there first (pushes and cache imports would go to it): root's process of /usr/bin/docker-registry
  # serving this script's config, which only root can read. Its pid is recorded in the pid file.
  local pid
  pid=$(listener_pid "${registry##*:}")
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe")" = /usr/bin/docker-registry ] \
    && [ "$(stat -c %u "/proc/$pid")" = 0 ] \
    && [ "$(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -d' ' -f2-)" = "serve $cache/registry.yml " ] \
    && echo "$pid" >"$registry_pidfile"
}

setup_registry() {
  # Loopback only, on its own port. The Debian package's service would listen on every interface at 5000:
  # policy-rc.d keeps its install from starting it, and one started before is stopped. The engine treats
  # 127.0.0.0/8 registries as insecure (plain HTTP) by default, so the engine's configuration is untouched.
  if ! dpkg -s docker-registry >/dev/null 2>&1; then
    local policy=/usr/sbin/policy-rc.d made=0
    [ -e $policy ] || { printf '#!/bin/sh\nexit 101\n' >$policy; chmod 0755 $policy; made=1; }
    apt_install docker-registry || { [ $made = 0 ] || rm -f $policy; die "apt-get install docker-registry failed"; }
    [ $made = 0 ] || rm -f $policy
  fi
  pkill -f '^/usr/bin/docker-registry serve /etc/docker/registry/config.yml' && say "stopped the docker-registry package's own service (every interface, :5000)" || true
  apt_install iproute2  # ss
  if registry_ours && registry_up "$registry"; then say "registry answers at $registry (pid $(cat "$registry_pidfile"), ours)"; return; fi
  local other; other=$(listener_pid "${registry##*:}")
  if [ -n "$other" ]; then
    die "$registry: port taken by pid $other ($(tr '\0' ' ' <"/proc/$other/cmdline" | cut -c1-120)), not the registry this script started; stop it, or set MODELBAKE_REGISTRY to a free loopback port"
  fi
  mkdir -p "$cache/registry"
  cat >"$cache/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $cache/registry}
  delete: {enabled: true}
http: {addr: $registry}
YAML
  # Tags the tests push again and again leave their old layers behind: collected while nothing serves them.
  /usr/bin/docker-registry garbage-collect --delete-untagged "$cache/registry.yml" >"$cache/registry-gc.log" 2>&1 \
    || say "registry garbage collection failed (log: $cache/registry-gc.log); going on with the storage as it is"
  say "starting a registry at $registry (storage: $cache/registry, log: $cache/registry.log)"
  nohup /usr/bin/docker-registry serve "$cache/registry.yml" >"$cache/registry.log" 2>&1 &
  for _ in $(seq 30); do registry_ours && registry_up "$registry" && break; sleep 1; done
  registry_ours && registry_up "$registry" \
    || { tail -20 "$cache/registry.log" >&2 || true; die "the registry did not answer at $registry within 30 s (log above)"; }
}

setup_second_builder() {
  # The first engine keeps the classic image store, where everything else here lives; its `docker` driver
  # can export neither a registry cache nor attestations. This one runs the containerd image store
  # (features.containerd-snapshotter), which can, as a fresh CI runner or a teammate's machine would. Its
  # own data-root, exec-root (so its own managed containerd), socket and bridge (no NAT: builds are offline).
  local sock=/run/modelbake-builder2.sock dir=$cache/builder2 root
  if ! DOCKER_HOST=unix://$sock timeout 10 docker info >/dev/null 2>&1; then
    apt_install iproute2
    root=$(trixie_root)
    ip link show mbbr2 >/dev/null 2>&1 || {
      ip link add mbbr2 type bridge && ip addr add 172.30.99.1/24 dev mbbr2; }
    ip link set mbbr2 up
    mkdir -p "$dir"
    printf '{"features": {"containerd-snapshotter": true}, "builder": {"gc": {"enabled": true, "defaultKeepStorage": "%s"}}}\n' \
      "${MODELBAKE_BUILD_CACHE_2:-20GB}" >"$dir/daemon.json"
    say "starting a second dockerd with the containerd image store (socket $sock, log: $dir/dockerd.log)"
    PATH="$root/usr/sbin:$root/usr/bin:$PATH" nohup dockerd --config-file "$dir/daemon.json" --data-root "$dir/data" \
      --exec-root /run/modelbake-builder2 --pidfile /run/modelbake-builder2.pid -H "unix://$sock" \
      --bridge mbbr2 --iptables=false --ip6tables=false >"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 60); do DOCKER_HOST=unix://$sock timeout 5 docker info >/dev/null 2>&1 && break; sleep 1; done
    DOCKER_HOST=unix://$sock timeout 10 docker info >/dev/null 2>&1 \
      || { tail -20 "$dir/dockerd.log" >&2 || true; die "the second dockerd did not answer within 60 s"; }
  fi
  if ! DOCKER_HOST=unix://$sock docker image inspect "$base_image" >/dev/null 2>&1; then
    say "copying $base_image into the second engine"
    docker save "$base_image" | DOCKER_HOST=unix://$sock docker load -q >/dev/null
  fi
  builder2=unix://$sock
}

free_gb() { df --output=avail -BG "$cache" | tail -1 | tr -dc 0-9; }

make_room() {
  # A full run took 22 GB at its peak from 31 GB free with the caches near their caps (39 GB from 49 GB free,
  # where they had room to grow): stage results, images, the venv, pytest's temp. BuildKit's gc
  # trims each cache only once it is over its cap, and a machine carrying the caches of earlier runs ran out
  # of disk before that (CI: ENOSPC installing the venv). So free space is checked up front and, when short,
  # what can be rebuilt is dropped, cheapest first: dangling images, the second engine's images and cache
  # (test-only, its base image kept), then the first engine's build cache. Never a user's tagged image.
  local need=${MODELBAKE_MIN_FREE_GB:-30} free step what
  free=$(free_gb)
  if [ "$free" -ge "$need" ]; then say "disk: $free GB free"; return; fi
  say "disk: $free GB free, a run needs about $need GB: dropping what can be rebuilt"
  for step in dangling second 20GB 0; do
    case $step in
      dangling) what="dangling images"; docker image prune -f >/dev/null ;;
      second)
        what="the second engine's images and build cache"
        DOCKER_HOST=$builder2 docker images --format '{{.Repository}}:{{.Tag}}' \
          | grep -vxF -e "$base_image" -e '<none>:<none>' \
          | xargs -r env DOCKER_HOST="$builder2" docker rmi >/dev/null 2>&1 || true
        DOCKER_HOST=$builder2 docker image prune -f >/dev/null
        DOCKER_HOST=$builder2 docker builder prune -af >/dev/null ;;
      *) what="the build cache down to $step"; docker builder prune -f --keep-storage "$step" >/dev/null ;;
    esac
    free=$(free_gb)
    say "  after dropping $what: $free GB free"
    [ "$free" -lt "$need" ] || return 0
  done
  [ "$free" -ge $((need / 2)) ] \
    || die "only $free GB free on $(df --output=target "$cache" | tail -1) after pruning every build cache; a run needs about $need GB: free some space (or set MODELBAKE_MIN_FREE_GB if you know the run needs less)"
}

setup_emulator() {
  # arm64 binaries run here through qemu, registered with the kernel (no systemd here to do it). Flag F opens
  # the interpreter at registration, so containers and chroots use it too. Debian 13's qemu 10, static: Debian
  # 12's qemu 7.2 crashes (SIGSEGV) loading onnxruntime 1.32's arm64 library, qemu 10 runs it. A handler
  # registered by someone else is kept when its qemu is 8 or newer. Never fatal: amd64 work goes on.
  local misc=/proc/sys/fs/binfmt_misc qemu=/usr/local/libexec/modelbake/qemu-aarch64 root current major
  root=$(trixie_fetch usr/bin/qemu-aarch64 qemu-user)
  cmp -s "$root/usr/bin/qemu-aarch64" $qemu || install -D -m 0755 "$root/usr/bin/qemu-aarch64" $qemu
  if [ ! -e $misc/register ] && ! mount -t binfmt_misc binfmt_misc $misc 2>/dev/null; then
    arm64="the kernel refused to mount binfmt_misc, so arm64 binaries cannot run here (no emulation: the host or container lacks the privilege)"
    return
  fi
  if [ -e $misc/qemu-aarch64 ]; then
    current=$(sed -n 's/^interpreter //p' $misc/qemu-aarch64)
    # (Debian's aarch64-binfmt-P takes the program as its first argument: ask the qemu it links to.)
    major=$("$(readlink -f "$current")" --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\).*/\1/p' || true)
    if [ "$current" != $qemu ] && [ "${major:-0}" -lt 8 ]; then
      say "replacing the arm64 handler $current (qemu ${major:-unknown}: too old for onnxruntime) by qemu 10"
      echo -1 >$misc/qemu-aarch64 || { arm64="could not unregister the old arm64 handler $current"; return; }
    fi
  fi
  if [ ! -e $misc/qemu-aarch64 ] \
    && ! sed "s#:[^:]*:\([A-Z]*\)\$#:$qemu:\1#" "$root/usr/share/qemu/binfmt.d/qemu-aarch64.conf" >$misc/register 2>/dev/null; then
    arm64="the kernel refused to register qemu-aarch64 in binfmt_misc, so arm64 binaries cannot run here"
    return
  fi
  arm64=ok
  say "arm64 emulation: $(sed -n 's/^interpreter //p' $misc/qemu-aarch64), $(sed -n 's/^flags: /flags /p' $misc/qemu-aarch64)"
}

setup_arm64() {
  # The arm64 base image (debootstrap under the emulator, minutes the first time), the arm64 wheels of the
  # run-time set, and both base images as one index in the registry, which a two-platform build names.
  [ "$arm64" = ok ] || return 0
  local tag=$base_image-arm64 tarball=$cache/rootfs-$suite_base-arm64.tar
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    if [ ! -s "$tarball" ]; then
      local rootfs=$cache/rootfs-$suite_base-arm64
      say "debootstrap --arch arm64 $suite_base under emulation (several minutes)"
      rm -rf "$rootfs"
      debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates "$suite_base" "$rootfs" "$(debian_mirror)" >"$cache/debootstrap-arm64.log" 2>&1 \
        || { tail -20 "$cache/debootstrap-arm64.log" >&2; die "debootstrap --arch arm64 failed (log above)"; }
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
      rm -rf "$rootfs"
    fi
    say "docker import --platform linux/arm64 $tag"
    docker import --platform linux/arm64 "$tarball" "$tag" >/dev/null
  fi
  local lock=$here/build/wheelhouse-lock-arm64.txt stamp=$wheelhouse/.lock-arm64.sha256 want
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "pip download the arm64 wheels of the run-time set, each checked against its locked sha256"
    python3 -m pip download -q --only-binary=:all: --no-deps --require-hashes -d "$wheelhouse" -r "$lock" \
      --platform manylinux_2_35_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --python-version 3.11 --implementation cp --abi cp311 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" >"$stamp"
  fi
  multi_base=$registry/${base_image%%:*}:${base_image##*:}
  if ! docker buildx imagetools inspect "$multi_base" 2>/dev/null | grep -q "linux/arm64"; then
    say "pushing both base images to $multi_base (one index: linux/amd64, linux/arm64)"
    local arch
    for arch in amd64 arm64; do
      local from=$base_image; [ $arch = amd64 ] || from=$tag
      docker tag "$from" "$multi_base-$arch" && docker push -q "$multi_base-$arch" >/dev/null
    done
    docker buildx imagetools create -t "$multi_base" "$multi_base-amd64" "$multi_base-arm64" >/dev/null 2>&1 \
      || die "could not write the two-platform base index $multi_base"
  fi
}

arm64="" multi_base=""
setup_engine
setup_base_image
setup_wheelhouse
setup_registry
setup_second_builder
make_room
setup_emulator
setup_arm64
printf 'export BASE_IMAGE=%q\nexport WHEELHOUSE=%q\nexport MODELBAKE_REGISTRY=%q\nexport MODELBAKE_BUILDER2=%q\n' \
  "$base_image" "$wheelhouse" "$registry" "$builder2"
printf 'export MODELBAKE_ARM64=%q\nexport MODELBAKE_MULTI_BASE=%q\n' "$arm64" "$multi_base"
