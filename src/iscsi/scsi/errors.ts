// The one place where an error from the volume stack becomes SCSI sense (like nbd/errors.ts for NBD).
//
//   errno                    sense key         ASC/ASCQ
//   EPERM, EROFS             DATA PROTECT      27/00 write protected
//   ENOSPC, EDQUOT, EFBIG    DATA PROTECT      27/07 space allocation failed
//   EINVAL, EOVERFLOW        ILLEGAL REQUEST   24/00 invalid field in CDB
//   ENOTSUP                  ILLEGAL REQUEST   20/00 invalid command operation code
//   ESHUTDOWN                NOT READY         04/03 manual intervention required
//   ENOMEM                   HARDWARE ERROR    44/00 internal target failure
//   EIO (and anything else)  MEDIUM ERROR      11/00 (read) or 0C/00 (write)
import { BlockDeviceError, type Errno } from '../../blockdev/types.js';
import { MiscompareError } from '../../blockdev/atomic.js';
import { Asc, SenseKey } from './constants.js';
import { miscompare, SenseError, StatusError, type SenseData } from './sense.js';

export function senseForDeviceError(err: unknown, writing: boolean): SenseData {
  if (err instanceof SenseError) return err.sense;
  if (err instanceof MiscompareError) return miscompare(err.firstDifference).sense;
  const errno: Errno = err instanceof BlockDeviceError ? err.errno : 'EIO';
  switch (errno) {
    case 'EPERM':
    case 'EROFS':
      return { key: SenseKey.DATA_PROTECT, asc: Asc.WRITE_PROTECTED };
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return { key: SenseKey.DATA_PROTECT, asc: Asc.SPACE_ALLOCATION_FAILED };
    case 'EINVAL':
    case 'EOVERFLOW':
      return { key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_FIELD_IN_CDB };
    case 'ENOTSUP':
      return { key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_OPCODE };
    case 'ESHUTDOWN':
      return { key: SenseKey.NOT_READY, asc: Asc.NOT_READY_MANUAL_INTERVENTION };
    case 'ENOMEM':
      return { key: SenseKey.HARDWARE_ERROR, asc: Asc.INTERNAL_TARGET_FAILURE };
    default:
      return { key: SenseKey.MEDIUM_ERROR, asc: writing ? Asc.WRITE_ERROR : Asc.UNRECOVERED_READ_ERROR };
  }
}

export { StatusError };
