// The one place where an internal errno becomes an NBD error on the wire.
// The mapping depends on the request: ENOTSUP is only legal as the answer to
// FAST_ZERO, EOVERFLOW only under DF (proto.md, "Error values").
import { CmdFlag, NbdErr } from '../protocol/constants.js';
import { BlockDeviceError, type Errno } from '../blockdev/types.js';

export function nbdErrorFor(err: unknown, cmdFlags: number): number {
  const errno: Errno = err instanceof BlockDeviceError ? err.errno : 'EIO';
  switch (errno) {
    case 'EPERM':
    case 'EROFS':
      return NbdErr.EPERM;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NbdErr.ENOSPC;
    case 'EINVAL':
      return NbdErr.EINVAL;
    case 'ENOMEM':
      return NbdErr.ENOMEM;
    case 'ESHUTDOWN':
      return NbdErr.ESHUTDOWN;
    case 'ENOTSUP':
      return cmdFlags & CmdFlag.FAST_ZERO ? NbdErr.ENOTSUP : NbdErr.EINVAL;
    case 'EOVERFLOW':
      return cmdFlags & CmdFlag.DF ? NbdErr.EOVERFLOW : NbdErr.EINVAL;
    default:
      return NbdErr.EIO;
  }
}
