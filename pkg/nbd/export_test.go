package nbd

// OfferSocket lets the kernel tests offer a device one fresh socket the
// way the maintainer does, to check how a live device's answer is read.
func OfferSocket(a *Attachment) (bool, error) { return a.reconnectOne() }
