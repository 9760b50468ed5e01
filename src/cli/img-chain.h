/* Chain verbs of cowtree-img (commit, rebase, pull, convert, measure). */
#ifndef CT_CLI_IMG_CHAIN_H
#define CT_CLI_IMG_CHAIN_H
#endif
