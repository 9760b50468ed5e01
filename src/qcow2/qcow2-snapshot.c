/*
 * Internal snapshot table: parsing and validation. (Create/apply/delete come with the
 * snapshot work; reading is needed by open, check and info.)
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

int qcow2_read_snapshots(struct qcow2_state *q, struct ct_err *err)
{
    if (q->nb_snapshots == 0) {
        return 0;
    }
    if (q->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        return ct_err_set(err, -CT_E_CORRUPT, "snapshot count %u exceeds the limit of %u",
                          q->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    }
    int64_t fsz = ct_file_size(q->file);
    if (q->snapshots_offset & (q->cluster_size - 1) || q->snapshots_offset == 0 ||
        fsz < 0 || q->snapshots_offset >= (uint64_t)fsz) {
        return ct_err_set(err, -CT_E_CORRUPT,
                          "snapshot table offset 0x%llx is invalid (unaligned or past the end "
                          "of the file)",
                          (unsigned long long)q->snapshots_offset);
    }
    q->snapshots = calloc(q->nb_snapshots, sizeof(*q->snapshots));
    if (!q->snapshots) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    uint64_t off = q->snapshots_offset, total = 0;
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        struct qcow2_snapshot *s = &q->snapshots[i];
        uint8_t h[QS_FIXED_LEN];
        int r = ct_file_pread(q->file, h, sizeof(h), off);
        if (r < 0) {
            return ct_err_set(err, r, "Could not read the snapshot table: %s", ct_strerror(r));
        }
        s->l1_offset = ld_be64(h + QS_L1_OFFSET);
        s->l1_size = ld_be32(h + QS_L1_SIZE);
        uint16_t id_len = ld_be16(h + QS_ID_SIZE), name_len = ld_be16(h + QS_NAME_SIZE);
        s->date_sec = ld_be32(h + QS_DATE_SEC);
        s->date_nsec = ld_be32(h + QS_DATE_NSEC);
        s->vm_clock_nsec = ld_be64(h + QS_VM_CLOCK_NSEC);
        s->vm_state_size = ld_be32(h + QS_VM_STATE_SIZE);
        s->extra_size = ld_be32(h + QS_EXTRA_SIZE);
        if (s->extra_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot %u has %u bytes of extra data (at most %u)", i,
                              s->extra_size, QCOW2_MAX_SNAPSHOT_EXTRA);
        }
        uint64_t len = QS_FIXED_LEN + s->extra_size + id_len + name_len;
        total += ct_align_up(len, 8);
        if (total > QCOW2_MAX_SNAPSHOT_TABLE_BYTES || off + len > (uint64_t)fsz) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot table is larger than 64 MiB or runs past the end of "
                              "the file");
        }
        uint8_t *rest = malloc(len - QS_FIXED_LEN + 1);
        if (!rest) {
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        r = ct_file_pread(q->file, rest, len - QS_FIXED_LEN, off + QS_FIXED_LEN);
        if (r < 0) {
            free(rest);
            return ct_err_set(err, r, "Could not read the snapshot table: %s", ct_strerror(r));
        }
        s->extra = malloc(s->extra_size ? s->extra_size : 1);
        s->id = strndup((char *)rest + s->extra_size, id_len);
        s->name = strndup((char *)rest + s->extra_size + id_len, name_len);
        if (!s->extra || !s->id || !s->name) {
            free(rest);
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        memcpy(s->extra, rest, s->extra_size);
        if (s->extra_size >= 8) {
            s->vm_state_size = ld_be64(rest + QS_EXTRA_VM_STATE_SIZE);
        }
        s->disk_size = q->img->size;
        if (s->extra_size >= 16) {
            s->disk_size = ld_be64(rest + QS_EXTRA_DISK_SIZE);
        }
        s->icount = UINT64_MAX;
        if (s->extra_size >= 24) {
            s->icount = ld_be64(rest + QS_EXTRA_ICOUNT);
        }
        free(rest);
        if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            return ct_err_set(err, -CT_E_CORRUPT, "snapshot '%s' has an L1 table of %u entries, "
                              "too large", s->name, s->l1_size);
        }
        if (s->l1_size &&
            ((s->l1_offset & (q->cluster_size - 1)) || s->l1_offset == 0 ||
             s->l1_offset + (uint64_t)s->l1_size * 8 > (uint64_t)fsz)) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot '%s' L1 table (offset 0x%llx) is unaligned or past the "
                              "end of the file",
                              s->name, (unsigned long long)s->l1_offset);
        }
        off += ct_align_up(len, 8);
    }
    return 0;
}
