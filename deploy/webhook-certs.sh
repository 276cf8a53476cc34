#!/usr/bin/env bash
# The admission webhook's certificate: a CA of its own and a server certificate for
# nsm-admission-webhook.nsm-system.svc, made with openssl; then (unless --files-only)
# the Secret nsm-admission-webhook-tls and the caBundle of the
# MutatingWebhookConfiguration, set with kubectl.
#
#   deploy/webhook-certs.sh [--files-only] [DIR]     (DIR: where the PEM files go)
set -euo pipefail

files_only=false
if [[ "${1:-}" == "--files-only" ]]; then
  files_only=true
  shift
fi
dir="${1:-$(mktemp -d)}"
mkdir -p "$dir"
service=nsm-admission-webhook
namespace=nsm-system
dns="$service.$namespace.svc"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=nsm-admission-webhook-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=$dns" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -days 825 -out "$dir/tls.crt" \
  -extfile <(printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.cluster.local\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
    "$dns" "$service" "$namespace" "$dns") 2>/dev/null
rm -f "$dir/tls.csr" "$dir/ca.srl"
echo "certificates in $dir"
$files_only && exit 0

kubectl -n "$namespace" create secret tls "$service-tls" \
  --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca_bundle="$(base64 -w0 < "$dir/ca.crt")"
kubectl patch mutatingwebhookconfiguration "$service" --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca_bundle\"}]"
