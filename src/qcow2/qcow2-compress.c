/*
 * Compressed cluster decoding. QEMU writes zlib clusters as raw deflate with a 4 KiB window
 * and zstd clusters as one frame without a length prefix; the stored length is only known to
 * 512-byte precision, so both decoders stop once a full cluster is produced and ignore what
 * follows.
 */
#include <errno.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2/qcow2.h"

static int inflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    z_stream s = {0};
    if (inflateInit2(&s, -12) != Z_OK) {
        return -ENOMEM;
    }
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_len;
    int zr = inflate(&s, Z_FINISH);
    int r = 0;
    if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) || s.avail_out != 0) {
        r = -EIO;
    }
    inflateEnd(&s);
    return r;
}

static int unzstd(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    ZSTD_DCtx *d = ZSTD_createDCtx();
    if (!d) {
        return -ENOMEM;
    }
    ZSTD_inBuffer ib = {in, in_len, 0};
    ZSTD_outBuffer ob = {out, out_len, 0};
    int r = 0;
    while (ob.pos < ob.size) {
        size_t zr = ZSTD_decompressStream(d, &ob, &ib);
        if (ZSTD_isError(zr)) {
            r = -EIO;
            break;
        }
        if (zr == 0 || (ib.pos == ib.size && ob.pos < ob.size)) {
            /* Frame ended or input exhausted before a whole cluster. */
            r = ob.pos == ob.size ? 0 : -EIO;
            break;
        }
    }
    ZSTD_freeDCtx(d);
    return r;
}

int qcow2_decompress(int type, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    return type == 1 ? unzstd(in, in_len, out, out_len) : inflate_raw(in, in_len, out, out_len);
}

static int deflate_raw(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
                       size_t *out_len)
{
    z_stream s = {0};
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
        return -ENOMEM;
    }
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_cap;
    int zr = deflate(&s, Z_FINISH);
    int r = zr == Z_STREAM_END ? 0 : -ENOSPC;
    *out_len = out_cap - s.avail_out;
    deflateEnd(&s);
    return r;
}

int qcow2_compress(int type, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
                   size_t *out_len)
{
    if (type == 1) {
        size_t n = ZSTD_compress(out, out_cap, in, in_len, 3);
        if (ZSTD_isError(n)) {
            return -ENOSPC;
        }
        *out_len = n;
        return 0;
    }
    return deflate_raw(in, in_len, out, out_cap, out_len);
}
