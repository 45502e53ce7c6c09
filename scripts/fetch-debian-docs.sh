#!/usr/bin/env bash
# Fetches the PDFs of the retrieval-evaluation corpus (benches/data/debian-eval.jsonl): the manuals
# shipped by a few pinned Debian bookworm documentation packages. Each package is downloaded with
# `apt-get download PKG=VERSION` (no root needed), unpacked with `dpkg-deb -x` (not installed), and
# its PDF copied (gunzipped where it ships as .pdf.gz) into DIR under a flat, stable name. Every
# PDF is checked against its SHA-256, so the page numbers in the labels stay valid.
# Idempotent: a PDF already in DIR with the right checksum is not fetched again.
#
#   scripts/fetch-debian-docs.sh [DIR]      (default: .work/debian-docs beside this script's repo)
#
# Where apt-get cannot get a package (no apt, or a mirror without bookworm), the .deb is fetched
# from deb.debian.org's pool with curl and its own SHA-256 checked.
# debian-handbook (11.20220922) was left out: it ships only diagrams as PDF, not the book.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.work/debian-docs}"

# package version pool-path path-in-package output-name pdf-sha256 deb-sha256 (pages)
docs=(
  "debian-reference-en 2.100 pool/main/d/debian-reference/debian-reference-en_2.100_all.deb
   usr/share/debian-reference/debian-reference.en.pdf debian-reference.en.pdf
   32775deeca0770ac25282b0c894cbaae83f4dd4ab00e891b94e8f009c0366728
   9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"  # 261 pages
  "debian-faq 11.1 pool/main/d/debian-faq/debian-faq_11.1_all.deb
   usr/share/doc/debian/FAQ/debian-faq.en.pdf.gz debian-faq.en.pdf
   ea67ca925863324d97a30b5c926aed95efc687c689aa16788c9bed54525c0b47
   427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0"  # 73 pages
  "developers-reference 12.18 pool/main/d/developers-reference/developers-reference_12.18_all.deb
   usr/share/developers-reference/developers-reference.pdf developers-reference.pdf
   88e5ac4d15444fd3adb821dc863bd91b820e99a27e65728e74975ab1752652f5
   0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e"  # 114 pages
  "maint-guide 1.2.53 pool/main/m/maint-guide/maint-guide_1.2.53_all.deb
   usr/share/doc/maint-guide/maint-guide.en.pdf maint-guide.en.pdf
   0b94abf28167fb3fe59db3d03f99b5faa50d9f6f696a7864825c5d0378ba27ef
   762c8a400a36668d2eb814a3ba356b06488fd889dfce478eb11d5cfb189a47b5"  # 63 pages
)

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# As root, apt-get download drops to the _apt user, which cannot write into this private directory.
apt_opts=()
[ "$(id -u)" = 0 ] && apt_opts=(-o APT::Sandbox::User=root)

for entry in "${docs[@]}"; do
  read -r pkg version pool inner name pdf_sha deb_sha <<<"${entry//$'\n'/ }"
  if sha_ok "$dest/$name" "$pdf_sha"; then
    echo "have    $name ($pkg $version)"
    continue
  fi
  work="$tmp/$pkg"
  mkdir -p "$work"
  deb="$work/$(basename "$pool")"
  if ! (cd "$work" && apt-get "${apt_opts[@]}" download -qq "$pkg=$version") || [ ! -f "$deb" ]; then
    echo "apt-get download $pkg=$version failed; trying deb.debian.org" >&2
    curl -fsSL --retry 3 -o "$deb" "https://deb.debian.org/debian/$pool"
  fi
  sha_ok "$deb" "$deb_sha" || { echo "error: $deb: SHA-256 mismatch" >&2; exit 1; }
  dpkg-deb -x "$deb" "$work/x"
  case "$inner" in
    *.gz) gunzip -c "$work/x/$inner" >"$work/$name" ;;
    *) cp "$work/x/$inner" "$work/$name" ;;
  esac
  sha_ok "$work/$name" "$pdf_sha" || { echo "error: $name from $pkg $version: SHA-256 mismatch" >&2; exit 1; }
  mv -f "$work/$name" "$dest/$name"
  echo "fetched $name ($pkg $version)"
done
echo "Debian documentation PDFs in $dest"
