#!/usr/bin/env bash
# Install the benchmark's peers from Debian and build the C poll() forwarder floor.
# Idempotent: re-running only installs what is missing and rebuilds the floor.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pkgs=(socat ser2net conserver-server conserver-client openssh-server openssh-client gcc)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    # policy-rc.d keeps the packages' own services (sshd, conserver, ser2net) from starting.
    $sudo sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
    $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" || { $sudo rm -f /usr/sbin/policy-rc.d; exit 1; }
    $sudo rm -f /usr/sbin/policy-rc.d
fi
mkdir -p "$here/build"
gcc -O2 -Wall -Wextra -o "$here/build/floor" "$here/floor.c"
echo "setup ok: $(socat -V | sed -n 2p | tr -s ' ')"
