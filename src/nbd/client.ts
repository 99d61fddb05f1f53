// The NBD client's public face: everything the storage systems, the gateway, the CFS and the
// tests use, from the files of src/nbd/client/ (one concern each; client/client.ts explains them).
export { NbdProtocolError, type BlockSizeInfo, type BlockStatusExtent } from '../protocol/replies.js';
export { NbdConnectionError, NbdError, NbdOptionError, NbdTimeoutError } from './client/errors.js';
export { parseNbdUri, type ConnectOptions, type NbdUri } from './client/options.js';
export type { NbdTransport } from './client/handshake.js';
export {
  NbdClient,
  connect,
  connectTransport,
  listExports,
  type BlockStatusOptions,
  type ExportListing,
  type ReadOptions,
  type WriteOptions,
  type WritePayload,
  type ZeroOptions,
} from './client/client.js';
