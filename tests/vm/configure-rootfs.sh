#!/bin/bash
# Configure a debootstrapped Debian rootfs for perfbox's headless qemu test boots (scripts/vm-test).
# The guest has no network: everything perfbox needs is installed by debootstrap beforehand.
# At boot with systemd.unit=vmtest.target, vmtest.service mounts the payload disk (/dev/vdb), runs
# its guest.sh as root, streams the output to the virtio-serial port vmtest.results, saves
# out/test.log and out/rc on the payload disk and powers off.
set -euo pipefail
R=${1:?usage: configure-rootfs.sh ROOTFS}
echo vmtest >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmtest\n::1 localhost\n' >"$R/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$R/etc/fstab"
: >"$R/etc/resolv.conf"
chroot "$R" passwd -d root >/dev/null # root on the serial console without password (debugging only)
# Quiet and fast boots: no timers, no getty on tty1.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
  fstrim.timer dpkg-db-backup.timer man-db.timer logrotate.timer systemd-tmpfiles-clean.timer \
  getty@tty1.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
cat >"$R/usr/local/sbin/vmtest-run" <<'EOS'
#!/bin/bash
PORT=/dev/virtio-ports/vmtest.results
exec 3>/dev/null
[ -e $PORT ] && exec 3>$PORT
mkdir -p /mnt/payload
if ! mount /dev/vdb /mnt/payload; then
  echo "VMTEST: no payload disk" | tee /dev/ttyS0 >&3
  systemctl poweroff --no-block
  exit 1
fi
mkdir -p /mnt/payload/out
echo "VMTEST-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)" | tee /dev/ttyS0 >&3
set -o pipefail
bash /mnt/payload/guest.sh 2>&1 | tee /mnt/payload/out/test.log >&3
rc=$?
echo $rc >/mnt/payload/out/rc
echo "VMTEST-END rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)" | tee /dev/ttyS0 >&3
sync
umount /mnt/payload
systemctl poweroff --no-block
EOS
chmod 755 "$R/usr/local/sbin/vmtest-run"
cat >"$R/etc/systemd/system/vmtest.service" <<'EOS'
[Unit]
Description=Run the perfbox VM test payload and power off
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmtest-run
StandardOutput=journal+console
TimeoutStartSec=infinity
EOS
cat >"$R/etc/systemd/system/vmtest.target" <<'EOS'
[Unit]
Description=Boot target for automated tests
Requires=multi-user.target
Wants=vmtest.service
After=multi-user.target
AllowIsolate=yes
EOS
rm -f "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*_Packages 2>/dev/null || true
