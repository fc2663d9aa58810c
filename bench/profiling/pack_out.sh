# Sourced by the device scripts that bring back many files: pack_out DIR packs everything under DIR (less the models,
# .pth / .dp / .pb) into DIR/all.tgz, one file, so that the device's limits on what comes back hold at any count.
pack_out() {
  local d=${1:?pack_out DIR} t=/tmp/pack_out.$$.tgz
  (cd "$d" && tar czf "$t" --exclude="*.pth" --exclude="*.dp" --exclude="*.pb" .) \
    && rm -rf "${d:?}"/* && mv "$t" "$d/all.tgz" && ls -la "$d"
}
