#!/usr/bin/env bash
# Fetch the real sample media (OpenCV's sample data, Apache-2.0/BSD-3-Clause) into
# .samples/ on a Debian-like machine, from Debian's opencv-doc package.
#   scripts/fetch-samples.sh [DEST]           the demo's video and photos into DEST
#   scripts/fetch-samples.sh DEST --all-data  also every sample image into DEST/opencv-data
#                                             (the quality benchmark's photos)
set -euo pipefail
dest="${1:-.samples}"
all_data="${2:-}"
have_media=0
if [ -f "$dest/Megamind.avi" ] && [ -f "$dest/fruits.jpg" ]; then have_media=1; fi
if [ "$have_media" = 1 ] && { [ "$all_data" != "--all-data" ] || [ -f "$dest/opencv-data/box.png" ]; }; then
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "fetch-samples: needs apt-get and dpkg-deb (Debian/Ubuntu)." >&2
  echo "Pass your own files instead: make demo SAMPLE_VIDEO=video.mp4 SAMPLE_IMAGE=product.jpg" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching OpenCV sample media from Debian's opencv-doc package..."
(cd "$work" && apt-get download -qq opencv-doc 2>/dev/null)
dpkg-deb -x "$work"/opencv-doc_*.deb "$work/x"
mkdir -p "$dest"
data="$work/x/usr/share/doc/opencv-doc/examples/data"
for f in Megamind.avi tree.avi fruits.jpg apple.jpg orange.jpg baboon.jpg; do
  if [ -f "$data/$f" ]; then cp "$data/$f" "$dest/"; elif [ -f "$data/$f.gz" ]; then gunzip -c "$data/$f.gz" >"$dest/$f"; fi
done
if [ "$all_data" = "--all-data" ]; then
  mkdir -p "$dest/opencv-data"
  cp -r "$data"/. "$dest/opencv-data/"
  find "$dest/opencv-data" -name '*.gz' -exec gunzip -f {} +
  echo "sample images in $dest/opencv-data/"
fi
echo "sample media in $dest/"
