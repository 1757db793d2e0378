#!/usr/bin/env bash
# Builds the Debian package of virtman (cargo-deb: `cargo install cargo-deb
# --locked`): the binary, then its man pages and shell completions
# (`virtman generate-assets`, written next to the binary, where the assets in
# crates/cli/Cargo.toml's [package.metadata.deb] expect them), then the .deb.
#
#   dist/build-deb.sh                      # release build, .deb in TARGET/debian/
#   dist/build-deb.sh --profile dev        # the unoptimised build (what CI packages)
#   dist/build-deb.sh --profile dev --no-build --output /tmp/deb
#
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
output=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --output) output="$2"; shift 2 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v cargo-deb >/dev/null || {
  echo "build-deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
  exit 1
}

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
case "$profile" in
  dev) profile_dir=debug ;;
  *) profile_dir="$profile" ;;
esac
bin="$target_dir/$profile_dir/virtman"
output="${output:-$target_dir/debian}"
mkdir -p "$output"

if [ "$build" = 1 ]; then
  cargo build -p virtman --profile "$profile"
fi
[ -x "$bin" ] || { echo "build-deb.sh: $bin is missing (build it, or drop --no-build)" >&2; exit 1; }
rm -rf "$target_dir/$profile_dir/assets"
"$bin" generate-assets "$target_dir/$profile_dir/assets"

# --fast: the binary dominates the size, and xz at its default level takes
# most of the packaging time on a small machine.
cargo deb -p virtman --no-build --profile "$profile" --fast --output "$output"
ls -t "$output"/virtman_*.deb | head -n 1
