# Sourced by the device scripts that bring back many files (the device returns at most 8).
# snap SRC DIR: everything under SRC (less the models, .pth / .dp / .pb) into DIR/all.tgz, replaced whole (a call
# killed at its limit still brings back the last one). pack_out DIR: DIR's files into DIR/all.tgz, the rest removed.
snap() {
  local t="$2/all.tgz.part"
  tar czf "$t" --exclude="*.pth" --exclude="*.dp" --exclude="*.pb" --exclude="all.tgz*" -C "$1" . && mv "$t" "$2/all.tgz"
}
pack_out() {
  local d=${1:?pack_out DIR} t=/tmp/pack_out.$$
  rm -rf "$t" && mkdir -p "$t" && snap "$d" "$t" && rm -rf "${d:?}"/* && mv "$t/all.tgz" "$d/" && rm -rf "$t" && ls -la "$d"
}
