#!/bin/sh
# Runs a command the way systemd/hotweights.service runs the daemon, as far as a machine without a
# service manager allows: called by tests/support/unit_sandbox.py inside `unshare --mount --net` (so
# every mount below is private to the daemon and the network is empty, PrivateMounts= and
# PrivateNetwork=), as root; ends by exec'ing the command as the unit's user with its limits.
#
# Environment (set by unit_sandbox.py from the unit file and the test):
#   HW_SCRATCH   a root-only folder on the host for staging mounts
#   HW_REVEAL    "HIDDEN|PATH ..." : PATH (the python, the checkout) lies below HIDDEN, a folder the
#                service user may not enter (/root); HIDDEN is covered by an empty world-readable tmpfs
#                and PATH put back into it, so the user reaches PATH and nothing else there
#   HW_ETC       a folder with the passwd and group files systemd-sysusers wrote for the unit's user
#   HW_KEEP      the folders the daemon must reach (the python, the checkout), put back where PrivateTmp hides them
#   HW_BINDS     "HOST|INSIDE|rw-or-ro ..." : host folders or files shown inside (the runtime
#                directory, the models, the config), mounted after /run is made private
#   HW_USER HW_GROUP HW_GROUPS HW_UMASK HW_NOFILE HW_MEMLOCK   User=, Group=, SupplementaryGroups=
#                (comma-separated, may be empty), UMask=, LimitNOFILE=, LimitMEMLOCK=
set -eu

# Paths the service user must reach below a folder it cannot enter.
: > "$HW_SCRATCH/reveals"
i=0
for pair in $HW_REVEAL; do
  i=$((i + 1))
  mkdir -p "$HW_SCRATCH/reveal$i"
  mount --bind "${pair#*|}" "$HW_SCRATCH/reveal$i"
  echo "${pair%%|*}|${pair#*|}|$HW_SCRATCH/reveal$i" >> "$HW_SCRATCH/reveals"
done
for hidden in $(cut -d'|' -f1 "$HW_SCRATCH/reveals" | sort -u); do
  mount -t tmpfs -o mode=0755 hw-reveal "$hidden"
done
while IFS='|' read -r hidden path staged; do
  mkdir -p "$path"
  mount --move "$staged" "$path"
done < "$HW_SCRATCH/reveals"

# The unit's user and groups, as systemd-sysusers made them.
mount --bind "$HW_ETC/passwd" /etc/passwd
mount --bind "$HW_ETC/group" /etc/group

# A /run of the daemon's own (RuntimeDirectory= lives in it), then the test's folders. These come
# from /tmp, so they are mounted before PrivateTmp= hides the host's /tmp.
mount -t tmpfs -o mode=0755 hw-run /run
for bind in $HW_BINDS; do
  host=${bind%%|*}; rest=${bind#*|}; inside=${rest%|*}
  if [ -d "$host" ]; then mkdir -p "$inside"; else mkdir -p "$(dirname "$inside")"; touch "$inside"; fi
  mount --bind "$host" "$inside"
done

# PrivateTmp=yes. A checkout or a python under /tmp (a CI clone) is put back into the private /tmp.
: > /run/hw-keeps
i=0
for keep in $HW_KEEP; do
  case "$keep" in /tmp/*|/var/tmp/*) ;; *) continue ;; esac
  i=$((i + 1))
  mkdir -p "/run/hw-keep$i"
  mount --bind "$keep" "/run/hw-keep$i"
  echo "$keep|/run/hw-keep$i" >> /run/hw-keeps
done
mount -t tmpfs -o mode=1777 hw-tmp /tmp
[ -d /var/tmp ] && mount -t tmpfs -o mode=1777 hw-vartmp /var/tmp
while IFS='|' read -r keep staged; do
  mkdir -p "$keep"
  mount --move "$staged" "$keep"
done < /run/hw-keeps

# ProtectProc=invisible: a /proc of this mount namespace that shows other users' processes to nobody.
mount -t proc -o hidepid=invisible hw-proc /proc

# ProtectSystem=strict, ProtectHome=read-only, ProtectKernelTunables=yes: every mount read-only but
# /dev, /proc (less /proc/sys), the private /tmp and what the binds made writable.
mount --bind /proc/sys /proc/sys
writable="/tmp /var/tmp /run"
for bind in $HW_BINDS; do
  rest=${bind#*|}
  [ "${rest##*|}" = rw ] && writable="$writable ${rest%|*}"
done
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
  case "$mp" in
    /dev|/dev/*) continue ;;
    /proc|/proc/*) [ "$mp" = /proc/sys ] || continue ;;
  esac
  skip=no
  for w in $writable; do [ "$mp" = "$w" ] && skip=yes; done
  [ $skip = yes ] || mount -o remount,bind,ro "$mp" 2>/dev/null || true
done

# User=, Group=, SupplementaryGroups=, NoNewPrivileges=yes, CapabilityBoundingSet= (empty), UMask=,
# LimitNOFILE=, LimitMEMLOCK=.
if [ -n "$HW_GROUPS" ]; then groups="--groups=$HW_GROUPS"; else groups="--clear-groups"; fi
umask "$HW_UMASK"
exec prlimit --nofile="$HW_NOFILE:$HW_NOFILE" --memlock="$HW_MEMLOCK:$HW_MEMLOCK" -- \
  setpriv --reuid="$HW_USER" --regid="$HW_GROUP" "$groups" --no-new-privs \
  --bounding-set=-all --inh-caps=-all -- "$@"
