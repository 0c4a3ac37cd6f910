"""trustcap.netboot: the Pi's boot services for its HPC link (proxy-DHCP, TFTP, HTTP) and the boot image."""
