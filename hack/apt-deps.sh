#!/usr/bin/env bash
# Install the Debian packages `make test` and `make cluster-up` need, when they are missing.
#
# A no-op (one dpkg-query) when everything is installed, so every make run can call it. Missing packages are
# installed with apt-get when running as root; otherwise the script names them and fails, because the dev
# cluster needs root anyway. Packages, and who needs them:
#   iproute2 util-linux mount          network namespaces, veths, bridges; unshare/nsenter; bind mounts
#   iptables conntrack                 kube-proxy (iptables mode) inside each node's network namespace
#   runc containernetworking-plugins   the node's OCI runtime and CNI plugins (bridge, host-local, loopback, portmap)
#   buildah debootstrap                building images without a Docker daemon (devcluster/images.py)
#   podman                             saving built images into the OCI layout containerd imports (devcluster/images.py)
#   gcc libc6-dev                      the static sandbox ("pause") binary of the pause image
#   prometheus                         the real Prometheus the metrics tests start (its own daemon is kept off)
# containerd is not among them: the node runs containerd built from its Go module (hack/build-binaries.sh).
set -euo pipefail

PACKAGES=(iproute2 util-linux mount iptables conntrack runc containernetworking-plugins buildah debootstrap
  podman gcc libc6-dev prometheus)

installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)"
missing=()
for p in "${PACKAGES[@]}"; do
  grep -qx "$p install ok installed" <<<"$installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "apt-deps: missing Debian packages: ${missing[*]}" >&2
  echo "apt-deps: install them as root (sudo apt-get install ${missing[*]}) or run make as root" >&2
  exit 1
fi
echo "apt-deps: installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Packages with a daemon (prometheus) must not start it: the tests start their own on free ports.
created_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
((created_policy)) && rm -f /usr/sbin/policy-rc.d
if command -v systemctl >/dev/null && [[ " ${missing[*]} " == *" prometheus "* ]]; then
  systemctl disable --now prometheus 2>/dev/null || true
fi
echo "apt-deps: done"
