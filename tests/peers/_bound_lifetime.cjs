// Preloaded (`node --require ./_bound_lifetime.cjs …`) into third-party CLIs
// that cannot call `boundLifetime()` from `_peer.mjs` themselves, such as
// Prism. Same contract: exits on SIGTERM/SIGINT, after
// $PEER_MAX_LIFETIME_SECS (default 3600), and, when $PEER_EXIT_ON_STDIN_EOF=1,
// as soon as the parent closes stdin (so a crashed test leaves nothing behind).
'use strict';

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
const max = Number(process.env.PEER_MAX_LIFETIME_SECS ?? 3600);
if (Number.isFinite(max) && max > 0) {
  setTimeout(() => {
    console.error(`peer: maximum lifetime of ${max}s reached; exiting`);
    process.exit(3);
  }, max * 1000).unref();
}
if (process.env.PEER_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
