// Reads that land where the data belongs.
//
// A net.Socket in its default mode reads at most 64 KiB per syscall into a
// fresh buffer per read; on this machine that caps one connection near
// 1 GB/s, half of what nbdkit reaches. With `onread`, a socket reads into
// buffers we choose, as large as we like: a WRITE payload's bytes then go
// straight from the kernel into the payload buffer, and everything else into
// one reused scratch buffer.
//
// Node offers `onread` only for sockets it creates, not for the ones a server
// accepts, so after the handshake the connection's handle moves to a new
// Socket made with `onread`. This touches two internals that have been stable
// since Node 12 (`_handle`, and `_server` for the server's connection count);
// when they are missing, adopt() returns null and the caller keeps the
// default 'data' path, which is just slower.
import net from 'node:net';

export interface ReadInto {
  /** Where the next read may write (called before each read). */
  buffer: () => Buffer;
  /** n bytes were read into `buf`; return false to stop reading until resume(). */
  callback: (n: number, buf: Buffer) => boolean;
}

interface Internals {
  _handle?: unknown;
  _server?: unknown;
}

export function adopt(socket: net.Socket, onread: ReadInto): net.Socket | null {
  const inner = socket as unknown as Internals;
  // A TLS socket's handle is the TLS layer: its bytes must go through it.
  if (!inner._handle || socket.writableLength > 0 || socket.destroyed || (socket as { encrypted?: boolean }).encrypted) return null;
  socket.pause();
  socket.removeAllListeners();
  const next = new net.Socket({ handle: inner._handle, onread, allowHalfOpen: true } as net.SocketConstructorOpts);
  // The server counts connections on the socket it accepted: hand the count over.
  (next as unknown as Internals)._server = inner._server;
  inner._server = null;
  inner._handle = null;
  next.setNoDelay(true);
  return next;
}
