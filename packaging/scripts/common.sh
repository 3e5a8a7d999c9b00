# Shared by the Debian maintainer scripts and the RPM scriptlets: packaging/build
# pastes this file where a script says @COMMON@. POSIX sh, no bashisms.

H3GATE_CONF=/etc/h3gate/h3gate.conf
H3GATE_CERT=/etc/h3gate/site.pem
H3GATE_KEY=/etc/h3gate/site.key

# Creates the h3gate system user and group unless they exist: systemd-sysusers
# with the packaged sysusers.d entry when present, else $1 (adduser or useradd).
h3gate_create_user() {
    if getent passwd h3gate >/dev/null 2>&1; then
        return 0
    fi
    if command -v systemd-sysusers >/dev/null 2>&1 && [ -f /usr/lib/sysusers.d/h3gate.conf ]; then
        systemd-sysusers /usr/lib/sysusers.d/h3gate.conf
    elif [ "$1" = adduser ]; then
        adduser --system --group --home /nonexistent --no-create-home \
            --gecos "h3gate HTTP/3 proxy" --quiet h3gate
    else
        getent group h3gate >/dev/null 2>&1 || groupadd -r h3gate
        useradd -r -g h3gate -d /nonexistent -M -s /usr/sbin/nologin \
            -c "h3gate HTTP/3 proxy" h3gate
    fi
}

# /var/lib/h3gate (diagnostic mode's dump directory) and /var/log/h3gate (log files), owned by
# h3gate, for runs outside systemd too (the unit's StateDirectory=/LogsDirectory= make them
# at start). Existing directories keep the owner and mode an administrator gave them.
h3gate_make_dirs() {
    for dir in /var/lib/h3gate /var/log/h3gate; do
        [ -d "$dir" ] && continue
        mkdir -p "$dir"
        chown h3gate:h3gate "$dir"
        chmod 0750 "$dir"
    done
}

# 'h3gate check' fails unless the cert and key files exist, so on a machine
# that has neither file and a configuration that still names them, generate a
# self-signed placeholder pair and say so. Existing files are never touched.
h3gate_placeholder_cert() {
    if [ -e "$H3GATE_CERT" ] || [ -e "$H3GATE_KEY" ]; then
        return 0
    fi
    grep -Eq "^[[:space:]]*cert[[:space:]]+$H3GATE_CERT([[:space:]]|\$)" "$H3GATE_CONF" 2>/dev/null || return 0
    if ! command -v openssl >/dev/null 2>&1; then
        echo "h3gate: openssl not found, so no placeholder certificate was made;" \
            "'h3gate check' fails until $H3GATE_CERT and $H3GATE_KEY exist" >&2
        return 0
    fi
    host=$(hostname 2>/dev/null | tr -cd 'A-Za-z0-9.-' | cut -c1-63)
    [ -n "$host" ] || host=localhost
    san="DNS:$host,DNS:localhost,IP:127.0.0.1,IP:::1"
    [ "$host" = localhost ] && san="DNS:localhost,IP:127.0.0.1,IP:::1"
    tmp_key="$H3GATE_KEY.new.$$"
    tmp_cert="$H3GATE_CERT.new.$$"
    if ( umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -days 365 -subj "/CN=$host" -addext "subjectAltName=$san" \
            -keyout "$tmp_key" -out "$tmp_cert" ) >/dev/null 2>&1; then
        chown root:h3gate "$tmp_key"
        chmod 0640 "$tmp_key"
        chmod 0644 "$tmp_cert"
        mv -f "$tmp_key" "$H3GATE_KEY"
        mv -f "$tmp_cert" "$H3GATE_CERT"
        echo "h3gate: generated a self-signed PLACEHOLDER certificate for '$host'" \
            "($H3GATE_CERT, key $H3GATE_KEY root:h3gate 0640) so that the default" \
            "configuration passes 'h3gate check'. Browsers will not trust it:" \
            "replace both files with your real certificate and key." >&2
    else
        rm -f "$tmp_key" "$tmp_cert"
        echo "h3gate: openssl could not generate a placeholder certificate;" \
            "'h3gate check' fails until $H3GATE_CERT and $H3GATE_KEY exist" >&2
    fi
}

# True in a chroot (an image being built), when that can be told: the running
# kernel is not the target's then.
h3gate_in_chroot() {
    if command -v systemd-detect-virt >/dev/null 2>&1; then
        systemd-detect-virt --quiet --chroot 2>/dev/null
        return
    fi
    root_id=$(stat -c %d:%i / 2>/dev/null) || return 1
    init_root_id=$(stat -c %d:%i /proc/1/root/. 2>/dev/null) || return 1
    [ "$root_id" != "$init_root_id" ]
}

# Raises (never lowers) the UDP buffer limits now; /usr/lib/sysctl.d/60-h3gate.conf
# sets them at every boot. Not fatal: a container may not let us. Skipped in a
# chroot, whose /proc is the build machine's, and with H3GATE_SKIP_SYSCTL=1
# (image builds set it, for when a chroot cannot be detected).
h3gate_apply_sysctl() {
    [ "${H3GATE_SKIP_SYSCTL:-0}" = 1 ] && return 0
    h3gate_in_chroot && return 0
    for name in rmem_max wmem_max; do
        file=/proc/sys/net/core/$name
        current=$(cat "$file" 2>/dev/null) || continue
        [ "$current" -ge 7500000 ] 2>/dev/null && continue
        if ! (echo 7500000 >"$file") 2>/dev/null; then
            echo "h3gate: could not raise net.core.$name now ($current); it is set at next boot" >&2
        fi
    done
}
