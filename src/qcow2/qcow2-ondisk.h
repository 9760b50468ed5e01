/*
 * qcow2 on-disk constants (docs/interop/qcow2.txt facts). All fields are big-endian; this
 * file only names offsets and bits, the code reads them with ld_be*.
 */
#ifndef CT_QCOW2_ONDISK_H
#define CT_QCOW2_ONDISK_H

#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbu

/* Header field offsets. */
enum {
    QH_MAGIC = 0,
    QH_VERSION = 4,
    QH_BACKING_OFFSET = 8,
    QH_BACKING_SIZE = 16,
    QH_CLUSTER_BITS = 20,
    QH_SIZE = 24,
    QH_CRYPT_METHOD = 32,
    QH_L1_SIZE = 36,
    QH_L1_OFFSET = 40,
    QH_REFTABLE_OFFSET = 48,
    QH_REFTABLE_CLUSTERS = 56,
    QH_NB_SNAPSHOTS = 60,
    QH_SNAPSHOTS_OFFSET = 64,
    QH_V2_LENGTH = 72,
    QH_INCOMPAT = 72,
    QH_COMPAT = 80,
    QH_AUTOCLEAR = 88,
    QH_REFCOUNT_ORDER = 96,
    QH_HEADER_LENGTH = 100,
    QH_COMPRESSION_TYPE = 104,
    QH_V3_MIN_LENGTH = 104,
    QH_V3_LENGTH = 112, /* what cowtree (and QEMU 7.2) writes */
};

/* Feature bits. */
enum {
    QCOW2_INCOMPAT_DIRTY_BIT = 0,
    QCOW2_INCOMPAT_CORRUPT_BIT = 1,
    QCOW2_INCOMPAT_DATA_FILE_BIT = 2,
    QCOW2_INCOMPAT_COMPRESSION_BIT = 3,
    QCOW2_INCOMPAT_EXTL2_BIT = 4,
    QCOW2_COMPAT_LAZY_REFCOUNTS_BIT = 0,
    QCOW2_AUTOCLEAR_BITMAPS_BIT = 0,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW_BIT = 1,
};
#define QCOW2_INCOMPAT_DIRTY       (1ull << QCOW2_INCOMPAT_DIRTY_BIT)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << QCOW2_INCOMPAT_CORRUPT_BIT)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << QCOW2_INCOMPAT_DATA_FILE_BIT)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << QCOW2_INCOMPAT_COMPRESSION_BIT)
#define QCOW2_INCOMPAT_EXTL2       (1ull << QCOW2_INCOMPAT_EXTL2_BIT)
#define QCOW2_INCOMPAT_MASK                                                                        \
    (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE |                    \
     QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
#define QCOW2_COMPAT_LAZY_REFCOUNTS   (1ull << QCOW2_COMPAT_LAZY_REFCOUNTS_BIT)
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << QCOW2_AUTOCLEAR_BITMAPS_BIT)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << QCOW2_AUTOCLEAR_DATA_FILE_RAW_BIT)
#define QCOW2_AUTOCLEAR_MASK          (QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW)

/* Header extension types. */
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO         0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

/* L1/L2 entry bits. */
#define QCOW2_OFLAG_COPIED          (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED      (1ull << 62)
#define QCOW2_OFLAG_ZERO            1ull
#define QCOW2_L1E_OFFSET_MASK       0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK       0x00fffffffffffe00ull
#define QCOW2_L1E_RESERVED_MASK     0x7f000000000001ffull
#define QCOW2_L2E_STD_RESERVED_MASK 0x3f000000000001feull
#define QCOW2_REFT_OFFSET_MASK      0xfffffffffffffe00ull
#define QCOW2_REFT_RESERVED_MASK    0x1ffull

/* Extended L2 bitmap: bits 0-31 allocated, 32-63 reads-as-zero. */
#define QCOW2_SUBCLUSTERS      32
#define QCOW2_BITMAP_ALLOC_ALL 0x00000000ffffffffull
#define QCOW2_BITMAP_ZERO_ALL  0xffffffff00000000ull

/* Limits (QEMU's, so images interchange). */
#define QCOW2_MIN_CLUSTER_BITS         9
#define QCOW2_MAX_CLUSTER_BITS         21
#define QCOW2_MAX_L1_BYTES             (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES       (8u << 20)
#define QCOW2_MAX_BACKING_NAME         1023
#define QCOW2_MAX_SNAPSHOTS            65536
#define QCOW2_MAX_SNAPSHOT_TABLE_BYTES (64u << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA       1024
#define QCOW2_MAX_HOST_OFFSET          (1ull << 56)
#define QCOW2_FEATURE_NAME_LEN         46

/* Snapshot table entry field offsets. */
enum {
    QS_L1_OFFSET = 0,
    QS_L1_SIZE = 8,
    QS_ID_SIZE = 12,
    QS_NAME_SIZE = 14,
    QS_DATE_SEC = 16,
    QS_DATE_NSEC = 20,
    QS_VM_CLOCK_NSEC = 24,
    QS_VM_STATE_SIZE = 32,
    QS_EXTRA_SIZE = 36,
    QS_FIXED_LEN = 40,
    QS_EXTRA_VM_STATE_SIZE = 0,
    QS_EXTRA_DISK_SIZE = 8,
    QS_EXTRA_ICOUNT = 16,
};

#endif
