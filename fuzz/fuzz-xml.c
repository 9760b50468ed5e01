/*
 * fuzz-xml: the input is a libvirt XML document as the snapshot manager reads it: a
 * <domainsnapshot> (snapshot-create, --redefine: snapxml_parse_input) or a <domain>
 * (define --xml: mgr_define_xml). Every input goes to both entry points; each refuses the
 * other's root element, so mutations move freely between the two.
 *
 * mgr_define_xml goes on past parsing (names, targets, UUIDs, the images named by the disks,
 * the catalog), so the target runs in a private directory under /dev/shm with a manager home
 * ("home") and three images: disk.qcow2, base.qcow2 and top.qcow2 (backed by base.qcow2).
 * Before a define, the target parses the document itself with the same libxml2 options and
 * skips the define when any decoded text or attribute value holds a '/' or an entity
 * reference: the manager then only ever opens plain names in that directory. A domain that
 * was defined is undefined again, so runs are independent.
 *
 * A <domainsnapshot> that parses (and passes the same check) is also redefined
 * (mgr_snapshot_create_xml with redefine: metadata only, after checking the files) on the
 * domain "vm1", defined at start on its own images: vda = vm1.qcow2 (with an internal snapshot
 * "s1"), vdb = vm1-top.qcow2 on vm1-base.qcow2. After a successful redefine the manager home
 * is rebuilt from scratch, so runs stay independent.
 *
 * Oracles, besides the sanitizers: a refused document fills err with a negative code and a
 * message; a parsed <domainsnapshot> has well-formed disks (a name each, a known kind); a
 * defined domain is listed under the name returned and can be undefined; a redefined snapshot
 * is listed under the name returned; the document snapshot-dumpxml would write for what was
 * parsed (snapxml_format) parses again and gives back the same name, description, parent,
 * state, creation time and disk names and kinds (strings holding a carriage return, or in
 * attributes a tab or line feed, are left out of the comparison: XML normalizes those).
 */
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"
#include "fuzz-peer.h"
#include "manager/manager-int.h"
#include "manager/manager.h"

/* FUZZ_AVOID names (see fuzz-common.h): none. */

static struct mgr *mgr;
static char home[PATH_MAX];
static const char *const keep[] = {"home",      "disk.qcow2",    "base.qcow2",     "top.qcow2",
                                   "vm1.qcow2", "vm1-top.qcow2", "vm1-base.qcow2", NULL};

static void make_image(const char *name, const char *backing)
{
    struct ct_err err = {0};
    struct ct_create_opts co = {.format = "qcow2",
                                .size = 1u << 20,
                                .size_given = true,
                                .cluster_size = 4096,
                                .backing_file = backing,
                                .backing_format = backing ? "qcow2" : NULL};
    if (ct_image_create(name, &co, &err) < 0) {
        fz_die("creating %s: %s", name, err.msg);
    }
}

/* A fresh manager home holding the domain vm1 only. */
static void open_home(void)
{
    if (mgr) {
        mgr_close(mgr);
        mgr = NULL;
    }
    fz_clear_dir(keep + 1); /* everything but the images: the home goes */
    struct mgr_opts o = {.home = home};
    struct ct_err err = {0};
    if (mgr_open(&mgr, &o, &err) < 0) {
        fz_die("mgr_open: %s", err.msg);
    }
    const struct mgr_disk_arg disks[] = {{.target = "vda", .path = "vm1.qcow2"},
                                         {.target = "vdb", .path = "vm1-top.qcow2"}};
    if (mgr_define(mgr, "vm1", disks, 2, &err) < 0) {
        fz_die("defining vm1: %s", err.msg);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fz_verbose = getenv("FUZZ_VERBOSE") != NULL;
    const char *dir = fz_private_dir("fuzz-xml", argc, argv);
    make_image("disk.qcow2", NULL);
    make_image("base.qcow2", NULL);
    make_image("top.qcow2", "base.qcow2");
    make_image("vm1.qcow2", NULL);
    make_image("vm1-base.qcow2", NULL);
    make_image("vm1-top.qcow2", "vm1-base.qcow2");
    struct ct_image *img;
    struct ct_open_opts oo = {.format = "qcow2", .flags = CT_OPEN_WRITE};
    struct ct_err err = {0};
    if (ct_image_open(&img, "vm1.qcow2", &oo, &err) < 0 ||
        ct_snapshot_create(img, "s1", NULL, &err) < 0 || ct_image_close(img, &err) < 0) {
        fz_die("internal snapshot s1 of vm1.qcow2: %s", err.msg);
    }
    snprintf(home, sizeof(home), "%s/home", dir);
    open_home();
    xmlInitParser();
    return 0;
}

static bool unsafe_text(const xmlChar *s)
{
    return s && strchr((const char *)s, '/');
}

/* True when a value the manager may read holds a '/' or depends on an entity. */
static bool unsafe_node(xmlNode *n)
{
    for (; n; n = n->next) {
        switch (n->type) {
        case XML_ENTITY_REF_NODE:
        case XML_ENTITY_NODE:
        case XML_XINCLUDE_START:
            return true;
        case XML_TEXT_NODE:
        case XML_CDATA_SECTION_NODE:
            if (unsafe_text(n->content)) {
                return true;
            }
            break;
        case XML_ELEMENT_NODE:
            for (xmlAttr *a = n->properties; a; a = a->next) {
                if (unsafe_node(a->children)) {
                    return true;
                }
            }
            if (unsafe_node(n->children)) {
                return true;
            }
            break;
        default:
            break;
        }
    }
    return false;
}

static bool safe_to_define(const char *xml)
{
    xmlDoc *doc = xmlReadMemory(xml, (int)strlen(xml), "domain.xml", NULL,
                                XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
    if (!doc) {
        return true; /* refused by the parser before anything is opened */
    }
    bool unsafe = unsafe_node(doc->children);
    xmlFreeDoc(doc);
    return !unsafe;
}

static void check_refusal(const char *what, int r, const struct ct_err *err)
{
    if (r >= 0) {
        fz_die("%s returned %d", what, r);
    }
    if (err->code >= 0 || !err->msg[0]) {
        fz_die("%s failed (%d) without an error code and message (code %d, '%s')", what, r,
               err->code, err->msg);
    }
}

static bool same_str(const char *a, const char *b, const char *normalized)
{
    if (a && strpbrk(a, normalized)) {
        return true; /* the parser normalizes these characters: not comparable */
    }
    return a ? b && !strcmp(a, b) : true;
}

/* snapxml_format of what was parsed must parse again to the same values. */
static void round_trip(const struct snapxml_in *in)
{
    if (!in->name) {
        return;
    }
    struct m_snapdisk *sd = mgr_xcalloc(in->nd + 1, sizeof(*sd));
    for (size_t i = 0; i < in->nd; i++) {
        sd[i].target = in->disks[i].name;
        sd[i].kind = in->disks[i].kind == MGR_KIND_EXTERNAL   ? MK_EXTERNAL
                     : in->disks[i].kind == MGR_KIND_INTERNAL ? MK_INTERNAL
                                                              : MK_NO;
        sd[i].file = in->disks[i].file;
        sd[i].driver = in->disks[i].driver;
    }
    struct m_snap snap = {.name = in->name,
                          .desc = in->desc,
                          .state = in->state,
                          .parent = in->parent,
                          .ctime = in->ctime,
                          .disks = sd,
                          .nd = in->nd};
    struct m_domain dom = {.name = (char *)"vm1",
                           .uuid = (char *)"6c8a9a5e-1f43-4c6b-8a5e-0a9f3f2b1c11",
                           .type = (char *)"kvm"};
    char *out = snapxml_format(&dom, &snap);
    struct snapxml_in again;
    struct ct_err err = {0};
    if (snapxml_parse_input(out, &again, &err) < 0) {
        fz_die("the formatted snapshot document does not parse (%s):\n%s", err.msg, out);
    }
    if (!same_str(in->name, again.name, "\r") || !same_str(in->desc, again.desc, "\r") ||
        !same_str(in->parent, again.parent, "\r") ||
        !same_str(in->state ? in->state : "shutoff", again.state, "\r") ||
        (in->has_ctime && again.ctime != in->ctime) || again.nd != in->nd) {
        fz_die("the formatted snapshot document reads back differently:\n%s", out);
    }
    for (size_t i = 0; i < in->nd; i++) {
        int want = in->disks[i].kind < 0 ? MGR_KIND_NO : in->disks[i].kind;
        if (!same_str(in->disks[i].name, again.disks[i].name, "\t\n\r") ||
            again.disks[i].kind != want) {
            fz_die("disk %zu of the formatted snapshot document reads back differently:\n%s", i,
                   out);
        }
    }
    snapxml_in_free(&again);
    free(out);
    free(sd);
}

static void snapshot_xml(const char *xml)
{
    struct snapxml_in in;
    struct ct_err err = {0};
    int r = snapxml_parse_input(xml, &in, &err);
    if (r < 0) {
        check_refusal("snapxml_parse_input", r, &err);
        if (in.name || in.disks || in.dom_targets) {
            fz_die("snapxml_parse_input failed but left results behind");
        }
        return;
    }
    for (size_t i = 0; i < in.nd; i++) {
        int k = in.disks[i].kind;
        if (!in.disks[i].name ||
            (k != -1 && k != MGR_KIND_INTERNAL && k != MGR_KIND_EXTERNAL && k != MGR_KIND_NO)) {
            fz_die("snapshot disk %zu: name %p, kind %d", i, (void *)in.disks[i].name, k);
        }
    }
    for (size_t i = 0; i < in.ndom; i++) {
        if (!in.dom_targets[i] || !in.dom_sources[i]) {
            fz_die("<domain> disk %zu without target or source", i);
        }
    }
    round_trip(&in);
    snapxml_in_free(&in);
}

static void domain_xml(const char *xml)
{
    if (!safe_to_define(xml)) {
        return;
    }
    char *name = NULL;
    struct ct_err err = {0};
    int r = mgr_define_xml(mgr, xml, &name, &err);
    if (r < 0) {
        check_refusal("mgr_define_xml", r, &err);
        if (name) {
            fz_die("mgr_define_xml failed but returned a name");
        }
        return;
    }
    if (!name) {
        fz_die("mgr_define_xml succeeded without a name");
    }
    fz_log("defined domain '%s'", name);
    char **names = NULL;
    size_t n = 0;
    bool listed = false;
    if (mgr_domain_names(mgr, &names, &n, &err) < 0) {
        fz_die("mgr_domain_names: %s", err.msg);
    }
    for (size_t i = 0; i < n; i++) {
        listed |= !strcmp(names[i], name);
    }
    mgr_strv_free(names, n);
    if (!listed || n != 2) {
        fz_die("domain '%s' defined but %s (%zu domains)", name, listed ? "listed" : "not listed",
               n);
    }
    if (mgr_undefine(mgr, name, 0, &err) < 0) {
        fz_die("undefining the new domain '%s' failed: %s", name, err.msg);
    }
    free(name);
}

static void redefine_xml(const char *xml)
{
    if (!safe_to_define(xml)) {
        return;
    }
    struct mgr_create_opts flags = {0};
    char *name = NULL;
    struct ct_err err = {0};
    int r = mgr_snapshot_create_xml(mgr, "vm1", xml, &flags, true, false, &name, &err);
    if (r < 0) {
        check_refusal("mgr_snapshot_create_xml --redefine", r, &err);
        free(name);
        return;
    }
    if (!name) {
        fz_die("a redefined snapshot without a name");
    }
    fz_log("redefined snapshot '%s'", name);
    struct mgr_domain_info *info = NULL;
    if (mgr_domain_get(mgr, "vm1", &info, &err) < 0) {
        fz_die("mgr_domain_get after a redefine: %s", err.msg);
    }
    if (mgr_snap_index(info, name) < 0) {
        fz_die("redefined snapshot '%s' is not listed", name);
    }
    mgr_domain_info_free(info);
    free(name);
    open_home();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *xml = malloc(size + 1);
    if (!xml) {
        fz_die("out of memory");
    }
    memcpy(xml, data, size);
    xml[size] = 0;
    snapshot_xml(xml);
    domain_xml(xml);
    redefine_xml(xml);
    xmlResetLastError();
    free(xml);
    fz_clear_dir(keep);
    return 0;
}
