/*
 * The chain allocation index: which layer of an image's backing chain provides each 64 KiB
 * granule, so that a read falling through the top goes straight to that layer instead of
 * asking every layer in turn (a 64-deep chain then reads like a 1-deep one).
 *
 * An entry is learnt the first time a granule is read through the chain, by walking the
 * layers' block status once; it records the layer when one layer decides the whole granule
 * (allocated there, as data or zeros), "zeros" when no layer does (or a shorter layer's end
 * hides what lies below), and "mixed" otherwise (the read then takes the ordinary path).
 *
 * Invariants:
 *  X1. An entry is only used while the backing epoch is the one it was learnt in. The epoch
 *      moves whenever anything below a top can change what it reads: a write, zero write,
 *      discard, truncate, snapshot apply, repair, emptying or relink of an image that is a
 *      backing layer (depth > 0), a backing layer's poisoning, and every reopen or swap of a
 *      chain (image_chain_changed).
 *      Writes to a top do not move it: a top is always read before its index.
 *  X2. Memory is bounded: chunks of entries are allocated on first use, up to
 *      INDEX_MAX_BYTES per image; past that, reads take the ordinary path.
 *  X3. Entries are learnt 64 granules at a time (learn()), with the same result as one
 *      granule at a time.
 *  X4. An entry may also record where the layer keeps the granule's bytes (a whole granule of
 *      plain data, contiguous in the layer's file, in a driver with direct_data): reads then
 *      go to that file without asking the layer's own metadata again, so a deep chain costs
 *      what a one-layer image does. Anything that moves a backing layer's data (compaction)
 *      moves the epoch, as X1's mutations do.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "image/image.h"
#include "util/misc.h"

#define GRANULE_SHIFT   16
#define GRANULE         (1ull << GRANULE_SHIFT)
#define CHUNK_ENTRIES   4096
#define INDEX_MAX_BYTES (16u << 20)
#define LEARN_BATCH     64 /* granules learnt together (4 MiB) */

enum { E_UNKNOWN = 0, E_MIXED = 1, E_ZERO = 2, E_LAYER0 = 3 }; /* E_LAYER0 + i: layers[i] */

/* Entries of CHUNK_ENTRIES granules. host[k]: where granule k's bytes start in its layer's
 * file, in granules (X4); 0 when reads go through the layer (host 0 is never data). */
struct chunk {
    uint16_t ent[CHUNK_ENTRIES];
    uint32_t host[CHUNK_ENTRIES];
};

struct chain_index {
    uint64_t epoch;
    struct ct_image **layers; /* the backing chain, first backing first */
    /* layers[i]->file, kept dense: a direct read then touches one cache line of per-layer
     * state, which matters when 64 layers take turns (X4). */
    struct ct_file **files;
    unsigned nlayers;
    uint64_t nchunks;
    struct chunk **chunks;
    size_t bytes;
};

static _Atomic uint64_t backing_epoch;

void image_chain_changed(void)
{
    atomic_fetch_add(&backing_epoch, 1);
}

void image_index_free(struct ct_image *img)
{
    struct chain_index *x = img->index;
    if (!x) {
        return;
    }
    for (uint64_t i = 0; i < x->nchunks; i++) {
        free(x->chunks[i]);
    }
    free(x->chunks);
    free(x->layers);
    free(x->files);
    free(x);
    img->index = NULL;
}

/* The index of img, (re)built empty when missing or stale; NULL when none can be had. */
static struct chain_index *index_get(struct ct_image *img)
{
    uint64_t epoch = atomic_load(&backing_epoch);
    struct chain_index *x = img->index;
    if (x && x->epoch == epoch) {
        return x;
    }
    image_index_free(img);
    x = calloc(1, sizeof(*x));
    if (!x) {
        return NULL;
    }
    for (struct ct_image *l = img->backing; l; l = l->backing) {
        x->nlayers++;
    }
    x->layers = calloc(x->nlayers, sizeof(*x->layers));
    x->files = calloc(x->nlayers, sizeof(*x->files));
    x->nchunks = (img->backing->size >> GRANULE_SHIFT) / CHUNK_ENTRIES + 1;
    x->chunks = calloc(x->nchunks, sizeof(*x->chunks));
    if (!x->layers || !x->files || !x->chunks || x->nlayers + E_LAYER0 > UINT16_MAX) {
        free(x->layers);
        free(x->files);
        free(x->chunks);
        free(x);
        return NULL;
    }
    unsigned i = 0;
    for (struct ct_image *l = img->backing; l; l = l->backing, i++) {
        x->layers[i] = l;
        x->files[i] = l->file;
    }
    x->epoch = epoch;
    img->index = x;
    return x;
}

/*
 * Learn the unknown entries of granules [g0, g0+n) (ent[k] is granule g0+k's entry; one
 * chunk). Each layer is asked once per run of granules it reports alike, not once per granule,
 * so a batch costs about (layers x extents per layer) block-status calls instead of
 * (granules x depth). The result is what asking each granule alone would give (X3):
 *  - a layer decides a granule when one extent it reports covers the whole granule and is
 *    allocated (data or zeros);
 *  - an extent boundary inside a granule, a granule straddling a layer's end, or a failed
 *    status make it "mixed" (reads of it take the ordinary path);
 *  - a granule at or past a layer's end reads as zeros (hiding what lies below), as does one
 *    that no layer allocates.
 */
static void learn(struct chain_index *x, uint16_t *ent, uint32_t *host, uint64_t g0, uint64_t n)
{
    uint64_t pending = 0;
    for (uint64_t k = 0; k < n; k++) {
        pending += ent[k] == E_UNKNOWN;
    }
    for (unsigned i = 0; i < x->nlayers && pending; i++) {
        struct ct_image *l = x->layers[i];
        for (uint64_t k = 0; k < n;) {
            if (ent[k] != E_UNKNOWN) {
                k++;
                continue;
            }
            uint64_t off = (g0 + k) << GRANULE_SHIFT;
            uint16_t decided = E_UNKNOWN;
            struct ct_extent e = {0};
            if (off >= l->size) {
                decided = E_ZERO;
            } else if (off + GRANULE > l->size) {
                decided = E_MIXED;
            } else {
                uint64_t end = CT_MIN((g0 + n) << GRANULE_SHIFT, l->size);
                if (ct_image_block_status(l, off, end - off, &e) < 0 || e.len < GRANULE) {
                    decided = E_MIXED;
                }
            }
            if (decided != E_UNKNOWN) {
                ent[k++] = decided;
                pending--;
                continue;
            }
            /* Whole granules inside the extent: this layer decides them if it allocates. */
            uint64_t whole = e.len >> GRANULE_SHIFT;
            bool direct = l->drv->direct_data && !l->poison && (e.flags & CT_STATUS_DATA) &&
                          !(e.flags & (CT_STATUS_COMPRESSED | CT_STATUS_ZERO)) &&
                          e.host_off % GRANULE == 0;
            for (uint64_t j = k; j < k + whole && j < n; j++) {
                if (ent[j] == E_UNKNOWN && (e.flags & CT_STATUS_ALLOCATED)) {
                    ent[j] = (uint16_t)(E_LAYER0 + i);
                    uint64_t h = direct ? (e.host_off >> GRANULE_SHIFT) + (j - k) : 0;
                    host[j] = h < UINT32_MAX ? (uint32_t)h : 0;
                    pending--;
                }
            }
            k += whole;
        }
    }
    for (uint64_t k = 0; k < n; k++) {
        if (ent[k] == E_UNKNOWN) {
            ent[k] = E_ZERO;
        }
    }
}

/* Granule g's entry; *host as in struct chunk. */
static uint16_t entry(struct chain_index *x, uint64_t g, uint32_t *host)
{
    *host = 0;
    uint64_t c = g / CHUNK_ENTRIES;
    if (c >= x->nchunks) {
        return E_MIXED;
    }
    struct chunk *ch = x->chunks[c];
    if (!ch) {
        if (x->bytes + sizeof(*ch) > INDEX_MAX_BYTES || !(ch = calloc(1, sizeof(*ch)))) {
            return E_MIXED;
        }
        x->chunks[c] = ch;
        x->bytes += sizeof(*ch);
    }
    unsigned k = g % CHUNK_ENTRIES;
    if (ch->ent[k] == E_UNKNOWN) {
        /* The aligned batch around g (inside the chunk: LEARN_BATCH divides CHUNK_ENTRIES). */
        unsigned k0 = k & ~(LEARN_BATCH - 1u);
        learn(x, &ch->ent[k0], &ch->host[k0], g - (k - k0), LEARN_BATCH);
    }
    *host = ch->host[k];
    return ch->ent[k];
}

int image_read_below_indexed(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    struct ct_image *b = img->backing;
    struct chain_index *x = b->backing ? index_get(img) : NULL;
    if (!x) {
        /* (One backing layer: asking it directly is what the index would do.) */
        return ct_image_pread(b, buf, len, off);
    }
    uint8_t *p = buf;
    uint64_t end = off + len;
    while (off < end) {
        uint64_t g = off >> GRANULE_SHIFT;
        uint32_t host, next_host;
        uint16_t e = entry(x, g, &host);
        /* Extend the run over following granules with the same entry (and, read directly,
         * the next granule's bytes in the file right after this one's). */
        uint64_t run_end = CT_MIN((g + 1) << GRANULE_SHIFT, end);
        for (uint32_t want = host ? host + 1 : 0;
             run_end < end && entry(x, run_end >> GRANULE_SHIFT, &next_host) == e &&
             next_host == want;
             want += host ? 1 : 0) {
            run_end = CT_MIN(run_end + GRANULE, end);
        }
        uint64_t n = run_end - off;
        int r = 0;
        if (e == E_ZERO) {
            memset(p, 0, n);
        } else if (e >= E_LAYER0) {
            if (host) {
                uint64_t at = ((uint64_t)host << GRANULE_SHIFT) + (off & (GRANULE - 1));
                r = ct_file_pread(x->files[e - E_LAYER0], p, n, at);
            } else {
                r = ct_image_pread(x->layers[e - E_LAYER0], p, n, off);
            }
        } else {
            r = ct_image_pread(b, p, n, off);
        }
        if (r < 0) {
            return r;
        }
        p += n;
        off += n;
    }
    return 0;
}
