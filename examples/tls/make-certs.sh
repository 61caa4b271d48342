#!/usr/bin/env bash
# Creates a throw-away CA, a server certificate for "localhost" and a client certificate, and a
# mosquitto password file with user "gateway". For trying the example only.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p certs && cd certs
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 30 -subj "/CN=flowbus example CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 30 -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=flowbus-gateway" 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 30 2>/dev/null
rm -f ./*.csr ./*.ext ./*.srl
: > passwd
mosquitto_passwd -b passwd gateway "${GATEWAY_PASSWORD:-change-me}"
chmod 644 ./*
echo "certificates and password file in $(pwd)"
