#!/usr/bin/env bash
# Set up fedws on Debian/Ubuntu with Python >= 3.11: the Fashion-MNIST Debian package (when its
# files are absent), a virtual environment in .venv, torch, then fedws with its dev extra.
#   FEDWS_TORCH  torch requirement to install first (default torch==2.13.0; e.g. a CUDA build
#                from your own index: FEDWS_TORCH="torch --index-url ...")
#   FEDWS_VENV   where the virtual environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FEDWS_VENV:-.venv}
torch_req=${FEDWS_TORCH:-torch==2.13.0}
as_root=""
[ "$(id -u)" -eq 0 ] || as_root=sudo

apt_packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
    apt_packages+=(dataset-fashion-mnist)
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${apt_packages[*]}"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq "${apt_packages[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "setup: fedws needs Python >= 3.11, python3 is $(python3 -V)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $torch_req
"$venv/bin/python" -m pip install -q -e ".[dev]"
echo "setup: done; fedws is $venv/bin/fedws"
