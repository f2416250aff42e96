#!/usr/bin/env bash
# Build a Debian bookworm base image from Debian packages on this machine (debootstrap
# + `docker import`), so nothing is pulled from a Docker registry. Usage:
#   deploy/base-image.sh [TAG]      (default edgebundle/debian:bookworm-slim)
# The root file system is the minbase variant, the same package set as the official
# debian:bookworm-slim; an image already tagged TAG is kept (delete it to rebuild).
set -euo pipefail
tag="${1:-edgebundle/debian:bookworm-slim}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image: $tag exists"; exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo -n)  # debootstrap makes device nodes and chroots
root="$(mktemp -d /var/tmp/edgebundle-base.XXXXXX)"
trap '${sudo[@]+"${sudo[@]}"} rm -rf "$root"' EXIT
${sudo[@]+"${sudo[@]}"} nice -n 19 debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# what the slim image does too: no package caches, apt keeps none
${sudo[@]+"${sudo[@]}"} sh -c 'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' - "$root"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
  "$mirror" "$mirror" | ${sudo[@]+"${sudo[@]}"} tee "$root/etc/apt/sources.list" >/dev/null
${sudo[@]+"${sudo[@]}"} tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "base-image: built $tag"
