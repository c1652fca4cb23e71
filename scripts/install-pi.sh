#!/usr/bin/env bash
# Install edge-agent on Raspberry Pi OS (Bookworm) or plain Debian bookworm arm64 as a supervised systemd service.
#
#   sudo scripts/install-pi.sh --kind call-point|building-button|camera-box [--receiver] [--base auto|raspios|debian]
#                              [--model-from URL] [--root DIR] [--dry-run]
#
# --dry-run prints every command instead of running it; --root installs below DIR (for tests and
# image building; the base is then raspios unless --base says otherwise). --model-from fetches the camera
# box's model from a mirror or a file:// URL (checked against the manifest's sha256 all the same).
# Provisioning (keys, config, enrolment) is a separate step: edge-agent provision.
set -euo pipefail

KIND=call-point
ROOT=/
DRY_RUN=0
RECEIVER=0
BASE=auto
MODEL_FROM=
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/edge-agent

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --kind) KIND=${2:?--kind needs a value}; shift 2 ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --base) BASE=${2:?--base needs auto, raspios or debian}; shift 2 ;;
    --model-from) MODEL_FROM=${2:?--model-from needs a URL}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --receiver) RECEIVER=1; shift ;;
    -h|--help) usage ;;
    *) echo "install-pi.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
case "$KIND" in
  call-point|building-button) EXTRAS="" ;;          # the core only: no numpy, OpenCV or interpreter
  camera-box) EXTRAS="detect" ;;
  *) echo "install-pi.sh: --kind must be call-point, building-button or camera-box, not '$KIND'" >&2; exit 2 ;;
esac
case "$BASE" in
  auto|raspios|debian) ;;
  *) echo "install-pi.sh: --base must be auto, raspios or debian, not '$BASE'" >&2; exit 2 ;;
esac
R=${ROOT%/}

run() {
  if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
apt_has() { apt-cache show "$1" >/dev/null 2>&1; }

# 1. System packages. Raspberry Pi OS has picamera2 and lgpio in apt; plain Debian has neither: lgpio then
#    comes from PyPI (the [pi] extra) and a camera box uses the OpenCV backend (USB/V4L2 or IP cameras).
if [ "$R" = "" ]; then
  run apt-get update
  if [ "$BASE" = auto ]; then
    if [ -e /etc/rpi-issue ] || apt_has python3-picamera2; then BASE=raspios; else BASE=debian; fi
  fi
elif [ "$BASE" = auto ]; then
  BASE=raspios
fi
APT="python3-venv mosquitto-clients"
if [ "$BASE" = raspios ]; then
  APT="python3-venv python3-lgpio mosquitto-clients"
  [ "$KIND" = camera-box ] && APT="$APT python3-picamera2"
else
  echo "base: plain Debian (no Raspberry Pi packages): lgpio from PyPI$([ "$KIND" = camera-box ] && echo \
    "; python3-picamera2 does not exist here, so the camera box uses the OpenCV backend (a USB/V4L2 or IP camera, not camera = \"picamera2\")")"
  EXTRAS=${EXTRAS:+$EXTRAS,}pi
fi
if [ "$R" = "" ]; then
  missing=""
  for package in $APT; do apt_has "$package" || missing="$missing $package"; done
  if [ -n "$missing" ]; then  # before anything is installed: never a half install
    echo "install-pi.sh: apt has no package${missing} here (base $BASE); nothing was installed." >&2
    [ "$BASE" = raspios ] && echo "  on plain Debian (no Raspberry Pi archive) use --base debian" >&2
    exit 1
  fi
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y $APT
else
  printf 'skipping apt-get (installing below %s): would install %s\n' "$ROOT" "$APT"
fi
if [ "$RECEIVER" = 1 ]; then  # the centre's extras (metrics) on top of what the device kind needs
  EXTRAS=${EXTRAS:+$EXTRAS,}centre
fi
SPEC="$SOURCE${EXTRAS:+[$EXTRAS]}"
# Pinned versions, tested on arm64 (scripts/arm64-check): two devices flashed a month apart run the same code.
CONSTRAINTS="$SOURCE/scripts/constraints/$KIND.txt"
PIN=()
[ -f "$CONSTRAINTS" ] && PIN=(-c "$CONSTRAINTS")

# 2. Service users, in the gpio and video groups.
if [ "$R" = "" ]; then
  getent passwd edge-agent >/dev/null || run useradd --system --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin edge-agent
  # Raspberry Pi OS gives the gpio group the GPIO chips; plain Debian has neither the group nor the rule.
  if ! getent group gpio >/dev/null; then
    run groupadd --system gpio
    if [ "$DRY_RUN" = 1 ]; then
      echo "+ write /etc/udev/rules.d/60-edge-agent-gpio.rules"
    else
      install -d -m 0755 /etc/udev/rules.d
      echo 'SUBSYSTEM=="gpio", KERNEL=="gpiochip*", GROUP="gpio", MODE="0660"' >/etc/udev/rules.d/60-edge-agent-gpio.rules
    fi
  fi
  run usermod -a -G gpio,video edge-agent
  if [ "$RECEIVER" = 1 ]; then
    getent passwd edge-agent-receiver >/dev/null || run useradd --system --home-dir /var/lib/edge-agent-receiver --shell /usr/sbin/nologin edge-agent-receiver
  fi
fi

# 3. A venv that sees apt's picamera2 and lgpio, with the extras this kind of device needs.
run install -d -m 0755 "$R$PREFIX"
run python3 -m venv --system-site-packages "$R$PREFIX"
run "$R$PREFIX/bin/pip" install --upgrade pip "${PIN[@]}"
run "$R$PREFIX/bin/pip" install "$SPEC" "${PIN[@]}"

# 4. Configuration and credentials directories (root only); state is created by systemd.
run install -d -m 0755 "$R/etc/edge-agent"
run install -d -m 0700 "$R/etc/edge-agent/credentials"

# 5. Models for camera boxes (detector and face redaction), verified against the manifest.
if [ "$KIND" = camera-box ]; then
  run install -d -m 0755 "$R/var/lib/edge-agent/models"
  run "$R$PREFIX/bin/edge-agent" models fetch ssd-mobilenet-v1-coco-quant --model-dir "$R/var/lib/edge-agent/models" \
    ${MODEL_FROM:+--from "$MODEL_FROM"}
  # the face model that redacts every picture (evidence, snapshots): without it none is written
  run "$R$PREFIX/bin/edge-agent" models fetch blazeface-full-range --model-dir "$R/var/lib/edge-agent/models"
fi

# 6. systemd units (enabled; started after provisioning).
run install -d -m 0755 "$R/etc/systemd/system"
run install -m 0644 "$SOURCE/systemd/edge-agent.service" "$R/etc/systemd/system/edge-agent.service"
# zero-touch enrolment at first boot: does nothing unless an enrolment file is on the boot partition
run install -m 0644 "$SOURCE/systemd/edge-agent-enrol.service" "$R/etc/systemd/system/edge-agent-enrol.service"
[ "$RECEIVER" = 1 ] && run install -m 0644 "$SOURCE/systemd/edge-agent-receiver.service" "$R/etc/systemd/system/edge-agent-receiver.service"

# 7. Credentials: the units get only the files their drop-in lists (LoadCredential=, one per credential the
#    config names that exists). provision writes it; on a re-install it is written again from what is there.
if [ -f "$R/etc/edge-agent/agent.toml" ]; then
  run "$R$PREFIX/bin/edge-agent" config credentials "$R/etc/edge-agent/agent.toml" --unit-dir "$R/etc/systemd/system"
fi
if [ "$RECEIVER" = 1 ] && [ -f "$R/etc/edge-agent/receiver.toml" ]; then
  run "$R$PREFIX/bin/edge-agent" config credentials "$R/etc/edge-agent/receiver.toml" --receiver --unit-dir "$R/etc/systemd/system"
fi
if [ "$R" = "" ]; then
  # Without a running systemd (an image built in a chroot, a container) there is nothing to reload; enable works.
  if [ -d /run/systemd/system ]; then run systemctl daemon-reload; fi
  run systemctl enable edge-agent.service edge-agent-enrol.service
else
  printf 'skipping systemctl (installing below %s)\n' "$ROOT"
fi

cat <<NEXT
Installed. Next:
  sudo $PREFIX/bin/edge-agent provision --device-id ID --site SITE --kind $KIND --broker mqtts://BROKER --ca-file CA.pem --centre-key centre.jwk
  (enrol the printed record at the centre), then
  sudo $PREFIX/bin/edge-agent selftest --config /etc/edge-agent/agent.toml --interactive
  sudo systemctl start edge-agent && journalctl -u edge-agent -f
NEXT
if [ "$RECEIVER" = 1 ]; then
  cat <<NEXT
Receiver: write /etc/edge-agent/receiver.toml (examples/receiver.toml), then
  sudo $PREFIX/bin/edge-agent receiver init --config /etc/edge-agent/receiver.toml
  sudo $PREFIX/bin/edge-agent config credentials /etc/edge-agent/receiver.toml --receiver
  sudo systemctl enable --now edge-agent-receiver
NEXT
fi
