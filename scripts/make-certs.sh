#!/usr/bin/env bash
# Makes the certificates for TLS between the tiers: a private CA, the model server's certificate and a client
# certificate for the gateway (mutual TLS), each with an EC P-256 key, valid for 825 days.
#
#   scripts/make-certs.sh [--for-containers] [OUT_DIR] [SERVER_NAME...]
#
# OUT_DIR defaults to certs/. The keys are readable by their owner only, unless --for-containers: then the
# directory and the server and client keys are readable by all, as the containers run as their own user (10001)
# and mount the directory read-only (compose.tls.yaml); the CA's key stays private either way. The server certificate holds every SERVER_NAME given (default: model-server and
# localhost) and 127.0.0.1. An existing CA in OUT_DIR is kept, so certificates can be renewed under it.
# Files: ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, client-key.pem.
set -euo pipefail

readable=false
if [[ "${1:-}" == --for-containers ]]; then
    readable=true
    shift
fi
out="${1:-certs}"
shift || true
names=("$@")
((${#names[@]})) || names=(model-server localhost)
command -v openssl >/dev/null || { echo "make-certs.sh: needs openssl (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
umask 077
days=825

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -f ca.pem || ! -f ca-key.pem ]]; then
    key ca-key.pem
    openssl req -x509 -new -key ca-key.pem -sha256 -days "$days" -subj "/CN=image-serving CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.pem 2>/dev/null
fi

# sign NAME EXTENSIONS: a key and a certificate signed by the CA.
sign() {
    local name="$1" ext="$2"
    key "$name-key.pem"
    openssl req -new -key "$name-key.pem" -subj "/CN=$name" -out "$name.csr" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 -days "$days" \
        -extfile <(printf '%s\n' "$ext") -out "$name.pem" 2>/dev/null
    rm -f "$name.csr"
}

san="IP:127.0.0.1"
for n in "${names[@]}"; do san="DNS:$n,$san"; done
sign server "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
sign client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=DNS:gateway"
rm -f ca.srl
chmod 644 ca.pem server.pem client.pem
chmod 600 ca-key.pem server-key.pem client-key.pem
chmod 700 .
if $readable; then
    chmod 644 server-key.pem client-key.pem
    chmod 755 .
fi
echo "make-certs.sh: wrote ca.pem, server.pem (${names[*]}, 127.0.0.1) and client.pem with their keys in $out" >&2
