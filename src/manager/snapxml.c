/*
 * libvirt's <domainsnapshot> document: written for snapshot-dumpxml (valid against
 * domainsnapshot.rng: `virt-xml-validate FILE domainsnapshot`), read for snapshot-create and
 * --redefine.
 *
 * What cowtree knows beyond the schema (protection, state images after merges, materialized
 * states) is not written into the document, so that it always validates; the <domain>
 * element carries, per disk, the file holding the snapshot's state (the state image of an
 * external snapshot, the image holding an internal one), which is what --redefine needs.
 */
#include <errno.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <stdlib.h>
#include <string.h>

#include "manager/manager-int.h"
#include "util/err.h"

static const char *domain_type(const char *t)
{
    static const char *const ok[] = {"qemu", "kqemu",  "kvm",    "xen",  "lxc",  "uml", "openvz",
                                     "test", "vmware", "hyperv", "vbox", "phyp", "vz",  "bhyve"};
    for (size_t i = 0; t && i < sizeof(ok) / sizeof(ok[0]); i++) {
        if (strcmp(t, ok[i]) == 0) {
            return t;
        }
    }
    return "kvm";
}

char *snapxml_format(const struct m_domain *d, const struct m_snap *s)
{
    struct sbuf b = {0};
    sb_adds(&b, "<domainsnapshot>\n  <name>");
    sb_add_xml(&b, s->name);
    sb_adds(&b, "</name>\n");
    if (s->desc) {
        sb_adds(&b, "  <description>");
        sb_add_xml(&b, s->desc);
        sb_adds(&b, "</description>\n");
    }
    sb_adds(&b, "  <state>");
    sb_add_xml(&b, s->state ? s->state : "shutoff");
    sb_adds(&b, "</state>\n");
    if (s->parent) {
        sb_adds(&b, "  <parent>\n    <name>");
        sb_add_xml(&b, s->parent);
        sb_adds(&b, "</name>\n  </parent>\n");
    }
    sb_addf(&b, "  <creationTime>%lld</creationTime>\n", (long long)s->ctime);
    sb_adds(&b, "  <memory snapshot='no'/>\n  <disks>\n");
    for (size_t i = 0; i < s->nd; i++) {
        const struct m_snapdisk *sd = &s->disks[i];
        sb_adds(&b, "    <disk name='");
        sb_add_xml(&b, sd->target);
        if (sd->kind == MK_EXTERNAL) {
            sb_adds(&b, "' snapshot='external' type='file'>\n      <driver type='");
            sb_add_xml(&b, sd->driver ? sd->driver : "qcow2");
            sb_adds(&b, "'/>\n");
            if (sd->file) {
                sb_adds(&b, "      <source file='");
                sb_add_xml(&b, sd->file);
                sb_adds(&b, "'/>\n");
            }
            sb_adds(&b, "    </disk>\n");
        } else {
            sb_addf(&b, "' snapshot='%s'/>\n", sd->kind == MK_INTERNAL ? "internal" : "no");
        }
    }
    sb_adds(&b, "  </disks>\n  <domain type='");
    sb_add_xml(&b, domain_type(d->type));
    sb_adds(&b, "'>\n    <name>");
    sb_add_xml(&b, d->name);
    sb_adds(&b, "</name>\n    <uuid>");
    sb_add_xml(&b, d->uuid);
    sb_adds(&b, "</uuid>\n    <devices>\n");
    for (size_t i = 0; i < s->nd; i++) {
        const struct m_snapdisk *sd = &s->disks[i];
        const char *src = sd->image;
        const char *fmt = NULL;
        for (size_t j = 0; j < d->nd; j++) {
            if (strcmp(d->disks[j].target, sd->target) == 0) {
                fmt = d->disks[j].format;
                if (!src) {
                    src = d->disks[j].top;
                }
            }
        }
        sb_adds(&b, "      <disk type='file' device='disk'>\n");
        sb_adds(&b, "        <driver name='qemu' type='");
        sb_add_xml(&b, fmt ? fmt : "qcow2");
        sb_adds(&b, "'/>\n");
        if (src && src[0] == '/') {
            sb_adds(&b, "        <source file='");
            sb_add_xml(&b, src);
            sb_adds(&b, "'/>\n");
        }
        sb_adds(&b, "        <target dev='");
        sb_add_xml(&b, sd->target);
        sb_adds(&b, "'/>\n      </disk>\n");
    }
    sb_adds(&b, "    </devices>\n  </domain>\n</domainsnapshot>\n");
    return sb_steal(&b);
}

static xmlNode *child(xmlNode *n, const char *name)
{
    for (xmlNode *c = n ? n->children : NULL; c; c = c->next) {
        if (c->type == XML_ELEMENT_NODE && strcmp((const char *)c->name, name) == 0) {
            return c;
        }
    }
    return NULL;
}

static char *text(xmlNode *n)
{
    if (!n) {
        return NULL;
    }
    xmlChar *t = xmlNodeGetContent(n);
    char *s = mgr_xstrdup(t ? (const char *)t : "");
    xmlFree(t);
    return s;
}

static char *attr(xmlNode *n, const char *name)
{
    if (!n) {
        return NULL;
    }
    xmlChar *t = xmlGetProp(n, (const xmlChar *)name);
    char *s = t ? mgr_xstrdup((const char *)t) : NULL;
    xmlFree(t);
    return s;
}

void snapxml_in_free(struct snapxml_in *in)
{
    free(in->name);
    free(in->desc);
    free(in->state);
    free(in->parent);
    free(in->memory);
    for (size_t i = 0; i < in->nd; i++) {
        free(in->disks[i].name);
        free(in->disks[i].file);
        free(in->disks[i].driver);
    }
    free(in->disks);
    mgr_strv_free(in->dom_targets, in->ndom);
    mgr_strv_free(in->dom_sources, in->ndom);
    memset(in, 0, sizeof(*in));
}

int snapxml_parse_input(const char *xml, struct snapxml_in *in, struct ct_err *err)
{
    memset(in, 0, sizeof(*in));
    xmlDoc *doc = xmlReadMemory(xml, (int)strlen(xml), "snapshot.xml", NULL,
                                XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
    if (!doc) {
        const xmlError *e = xmlGetLastError();
        return ct_err_set(err, -EINVAL, "invalid snapshot XML: %s",
                          e && e->message ? e->message : "parse error");
    }
    int r = 0;
    xmlNode *root = xmlDocGetRootElement(doc);
    if (!root || strcmp((const char *)root->name, "domainsnapshot") != 0) {
        r = ct_err_set(err, -EINVAL, "expected a <domainsnapshot> document");
        goto out;
    }
    in->name = text(child(root, "name"));
    in->desc = text(child(root, "description"));
    in->state = text(child(root, "state"));
    in->parent = text(child(child(root, "parent"), "name"));
    char *ct = text(child(root, "creationTime"));
    if (ct) {
        char *end;
        long long v = strtoll(ct, &end, 10);
        if (*ct && !*end && v >= 0) {
            in->ctime = v;
            in->has_ctime = true;
        } else {
            r = ct_err_set(err, -EINVAL, "invalid creationTime '%s'", ct);
        }
        free(ct);
        if (r < 0) {
            goto out;
        }
    }
    xmlNode *mem = child(root, "memory");
    if (mem) {
        in->memory = attr(mem, "snapshot");
        char *file = attr(mem, "file");
        if (file || (in->memory && strcmp(in->memory, "no") != 0)) {
            free(file);
            r = ct_err_set(err, -CT_E_UNSUPPORTED,
                           "memory state snapshots are not supported (the domain is not "
                           "running): use <memory snapshot='no'/>");
            goto out;
        }
    }
    for (xmlNode *c = child(root, "disks") ? child(root, "disks")->children : NULL; c;
         c = c->next) {
        if (c->type != XML_ELEMENT_NODE || strcmp((const char *)c->name, "disk") != 0) {
            continue;
        }
        in->disks = mgr_xrealloc(in->disks, (in->nd + 1) * sizeof(*in->disks));
        struct snapxml_disk *dk = &in->disks[in->nd++];
        memset(dk, 0, sizeof(*dk));
        dk->name = attr(c, "name");
        char *k = attr(c, "snapshot");
        dk->kind = -1;
        if (k) {
            if (strcmp(k, "internal") == 0) {
                dk->kind = MGR_KIND_INTERNAL;
            } else if (strcmp(k, "external") == 0) {
                dk->kind = MGR_KIND_EXTERNAL;
            } else if (strcmp(k, "no") == 0) {
                dk->kind = MGR_KIND_NO;
            } else {
                r = ct_err_set(err, -CT_E_UNSUPPORTED, "disk snapshot mode '%s' is not supported",
                               k);
            }
            free(k);
        }
        char *type = attr(c, "type");
        if (type && strcmp(type, "file") != 0) {
            r = ct_err_set(err, -CT_E_UNSUPPORTED,
                           "disk snapshot type '%s' is not supported "
                           "(only file)",
                           type);
        }
        free(type);
        dk->file = attr(child(c, "source"), "file");
        dk->driver = attr(child(c, "driver"), "type");
        if (!dk->name) {
            r = ct_err_set(err, -EINVAL, "a <disk> of the snapshot has no name");
        }
        for (size_t i = 0; r == 0 && i + 1 < in->nd; i++) {
            if (strcmp(in->disks[i].name, dk->name) == 0) {
                /* One disk, one snapshot mode (libvirt refuses it the same way). */
                r = ct_err_set(err, -EINVAL, "disk '%s' is given twice in the snapshot", dk->name);
            }
        }
        if (r < 0) {
            goto out;
        }
    }
    xmlNode *dom = child(root, "domain");
    for (xmlNode *c = child(dom, "devices") ? child(dom, "devices")->children : NULL; c;
         c = c->next) {
        if (c->type != XML_ELEMENT_NODE || strcmp((const char *)c->name, "disk") != 0) {
            continue;
        }
        char *tgt = attr(child(c, "target"), "dev");
        char *src = attr(child(c, "source"), "file");
        if (!tgt || !src) {
            free(tgt);
            free(src);
            continue;
        }
        in->dom_targets = mgr_xrealloc(in->dom_targets, (in->ndom + 1) * sizeof(char *));
        in->dom_sources = mgr_xrealloc(in->dom_sources, (in->ndom + 1) * sizeof(char *));
        in->dom_targets[in->ndom] = tgt;
        in->dom_sources[in->ndom] = src;
        in->ndom++;
    }
out:
    xmlFreeDoc(doc);
    if (r < 0) {
        snapxml_in_free(in);
    }
    return r;
}
