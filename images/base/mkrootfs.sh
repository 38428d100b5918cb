#!/usr/bin/env bash
# The root filesystem of the dev base image: Debian bookworm (debootstrap, minbase) with Debian's Python 3.11,
# laid out like the official python:3.11-slim-bookworm image so the product Dockerfiles run unchanged on it:
# python/python3/python3.11 and pip in /usr/local/bin, pip allowed to install system-wide (no
# EXTERNALLY-MANAGED marker), ca-certificates, netbase and tzdata, no docs/man pages/locales (the slim images'
# dpkg path-excludes), bookworm's security and point-release updates applied. images/base/Dockerfile adds the
# same PATH and LANG the official image sets.
#
# Why not the official image: this machine reaches no container registry, only Debian's package mirror.
#
#   images/base/mkrootfs.sh OUT.tar          (root: debootstrap and chroot need it; ~2-3 min)
set -euo pipefail

out="${1:?usage: mkrootfs.sh OUT.tar}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
packages=python3,python3-venv,python3-pip,ca-certificates,netbase,tzdata

[[ "$(id -u)" == 0 ]] || { echo "mkrootfs: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "mkrootfs: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/var/tmp}/ft-rootfs.XXXXXX")"
root="$work/rootfs"
cleanup() {
  mountpoint -q "$root/proc" && umount "$root/proc"
  rm -rf "$work"
}
trap cleanup EXIT

debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror"

# The slim images' rule: no documentation, man pages or translations, now and for every later apt-get install.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/*

cat >"$root/etc/apt/sources.list" <<LIST
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
LIST
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -ec 'apt-get update -qq; apt-get -y -qq upgrade'
umount "$root/proc"
rm -f "$root/etc/resolv.conf"

# The official image's interface: its interpreter and pip live in /usr/local/bin and pip installs system-wide.
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3.11"
ln -sf python3.11 "$root/usr/local/bin/python3"
ln -sf python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip3"
rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"

# Nothing the build machine left behind: package caches and lists, logs, machine identity.
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
: >"$root/etc/machine-id"

tar --numeric-owner --xattrs -C "$root" -cf "$out.partial" .
mv -f "$out.partial" "$out"
echo "mkrootfs: $(du -h "$out" | cut -f1) $out"
