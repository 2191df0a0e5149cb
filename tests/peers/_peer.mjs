import crypto from 'node:crypto';
import { createRequire } from 'node:module';
// Small helpers shared by the peer servers: port parsing, lifetime bounds,
// JSON responses and bounded body reading. Everything listens on 127.0.0.1.

/** Host every peer binds to. */
export const HOST = '127.0.0.1';

/**
 * The port to listen on: first non-flag argv entry, else $PORT, else 0
 * (pick a free one). Exits with status 2 on garbage.
 */
export function listenPort(argv = process.argv.slice(2)) {
  const raw = argv.find((a) => !a.startsWith('--')) ?? process.env.PORT ?? '0';
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`invalid port ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return port;
}

/**
 * Bounds the process's life so a crashed test never leaves a peer behind:
 * exits on SIGTERM/SIGINT, after $PEER_MAX_LIFETIME_SECS (default 3600),
 * and, when $PEER_EXIT_ON_STDIN_EOF=1, as soon as the parent closes stdin
 * (which happens when the parent dies, however it dies).
 */
export function boundLifetime() {
  // One implementation, shared with CLIs started with `--require` (Prism).
  createRequire(import.meta.url)('./_bound_lifetime.cjs');
}

/** Writes a JSON response. */
export function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

/** Reads a request body of at most `limit` bytes (rejects beyond). */
export function readBody(req, limit = 1024 * 1024) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new Error(`request body over ${limit} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** Parses a JSON body; `{}` for an empty one. */
export async function readJson(req) {
  const text = await readBody(req);
  return text.trim() === '' ? {} : JSON.parse(text);
}

/**
 * A fresh 2048-bit RSA key pair, as KeyObjects.
 *
 * Node 20's key generation can deadlock for good when a generated key is
 * exported while the job that made it is being garbage-collected: the
 * export holds the key's lock while it allocates, the allocation runs the
 * collector, and the job's destructor waits on that same lock (seen here:
 * `generateKeyPairSync` then `publicKey.export({ format: 'jwk' })`, main
 * thread stuck in `~KeyGenJob`, about one run in 80 on a loaded machine;
 * twice it hung a CI run). So the pair is generated straight to DER, inside
 * the job, and re-imported: no key the job holds is ever exported.
 */
export function newRsaKeyPair() {
  const der = crypto.generateKeyPairSync('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'der' },
    privateKeyEncoding: { type: 'pkcs8', format: 'der' },
  });
  return {
    privateKey: crypto.createPrivateKey({ key: der.privateKey, format: 'der', type: 'pkcs8' }),
    publicKey: crypto.createPublicKey({ key: der.publicKey, format: 'der', type: 'spki' }),
  };
}
